"""Process-wide settings a bundle makes before it builds anything: seeds and backend flags, and DataLoader workers.

* :func:`seed_and_backends`: MONAI's ``set_determinism`` seeds every generator but also forces
  ``cudnn.deterministic=True`` and ``cudnn.benchmark=False`` (slower convolutions on CUDA). Here seeds are always
  set and determinism is a choice (the bundles' flat setting ``deterministic``, false for training, true in the
  tests); fp32 matrix products on CUDA use TF32 tensor cores unless determinism is asked for.
* :func:`keep_freed_memory`: on Linux (glibc), large tensors freed in one training step are kept for the next
  instead of being returned to the system and faulted in again page by page (a CPU fine-tuning step of ViTSeg at
  64³ spent more time in the kernel than in the network).
* :func:`available_cpus` / :func:`default_num_workers`: the CPUs this process may run on (affinity mask and
  cgroup quota, as set by Slurm, Kubernetes or ``taskset``), not the machine's count.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform

import torch
from monai.utils import set_determinism

__all__ = ["available_cpus", "default_num_workers", "keep_freed_memory", "seed_and_backends"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

_CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def seed_and_backends(seed: int, deterministic: bool = False, device: str | torch.device = "cpu") -> None:
    """Seed Python, NumPy and torch (MONAI's ``set_determinism``), then set the backend flags.

    Args:
        seed: the seed (bundles add the rank under ``torchrun``).
        deterministic: True: cuDNN picks deterministic kernels (``cudnn.deterministic``, no autotuning) and fp32
            matrix products stay in full fp32. False: cuDNN autotunes (``cudnn.benchmark``) and, on CUDA,
            fp32 matrix products and convolutions use TF32 (``torch.backends.cuda.matmul.allow_tf32``).
        device: the run's device; TF32 is switched on only for CUDA, :func:`keep_freed_memory` only for a CPU.

    Raises:
        ValueError: when ``deterministic`` is not a bool.
    """
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be true or false, got {deterministic!r}.")
    if torch.device(device).type == "cpu":
        keep_freed_memory()
    set_determinism(seed=seed)  # also sets cudnn.deterministic=True, cudnn.benchmark=False
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


def keep_freed_memory(max_block: int = 1 << 30) -> bool:
    """Let glibc keep freed blocks of up to ``max_block`` bytes for reuse instead of unmapping them.

    By default glibc serves every allocation above 32 MiB with its own ``mmap`` and unmaps it when freed, so each
    training step on a CPU faults its large activations in again, page by page, and the kernel zeroes every page:
    a ViTSeg (192 x 6, 8³ patches) step on two 64³ crops took 257,000 minor page faults and 0.66 s of system time,
    against none with this setting (``docs/gpu.md``, "CPU fine-tuning steps"). The cost: memory freed by the
    process stays mapped to it (its resident size stays near its peak). Process-wide; call it once, early.

    Args:
        max_block: the largest block served from the heap, in bytes. Defaults to 1 GiB.

    Returns:
        True when glibc took the setting; False elsewhere (another C library or OS: nothing is changed).

    Raises:
        ValueError: for ``max_block`` outside 1 MiB .. 2 GiB.
    """
    if not (1 << 20) <= int(max_block) < (1 << 31):
        raise ValueError(f"max_block must be between 1 MiB and 2 GiB, got {max_block!r}.")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    taken = libc.mallopt(_M_MMAP_THRESHOLD, int(max_block)) == 1
    return taken and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask (``os.sched_getaffinity``), capped by a cgroup v2 quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(_CGROUP_CPU_MAX, encoding="utf-8") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def default_num_workers(device: str | torch.device, cap: int = 8) -> int:
    """DataLoader workers per process: on CUDA the available CPUs shared by the processes of this node
    (``LOCAL_WORLD_SIZE`` under ``torchrun``), between 1 and ``cap``; 4 on a CPU (the training itself needs
    the cores there)."""
    if torch.device(device).type != "cuda":
        return 4
    per_process = available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(cap, max(1, per_process))
