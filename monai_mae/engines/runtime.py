"""Process-wide settings a bundle makes before it builds anything: seeds and backend flags, and DataLoader workers.

* :func:`seed_and_backends`: MONAI's ``set_determinism`` seeds every generator but also forces
  ``cudnn.deterministic=True`` and ``cudnn.benchmark=False`` (slower convolutions on CUDA). Here seeds are always
  set and determinism is a choice (the bundles' flat setting ``deterministic``, false for training, true in the
  tests); fp32 matrix products on CUDA use TF32 tensor cores unless determinism is asked for.
* :func:`available_cpus` / :func:`default_num_workers`: the CPUs this process may run on (affinity mask and
  cgroup quota, as set by Slurm, Kubernetes or ``taskset``), not the machine's count.
"""

from __future__ import annotations

import math
import os

import torch
from monai.utils import set_determinism

__all__ = ["available_cpus", "default_num_workers", "seed_and_backends"]

_CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def seed_and_backends(seed: int, deterministic: bool = False, device: str | torch.device = "cpu") -> None:
    """Seed Python, NumPy and torch (MONAI's ``set_determinism``), then set the backend flags.

    Args:
        seed: the seed (bundles add the rank under ``torchrun``).
        deterministic: True: cuDNN picks deterministic kernels (``cudnn.deterministic``, no autotuning) and fp32
            matrix products stay in full fp32. False: cuDNN autotunes (``cudnn.benchmark``) and, on CUDA,
            fp32 matrix products and convolutions use TF32 (``torch.backends.cuda.matmul.allow_tf32``).
        device: the run's device; TF32 is switched on only for CUDA.

    Raises:
        ValueError: when ``deterministic`` is not a bool.
    """
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be true or false, got {deterministic!r}.")
    set_determinism(seed=seed)  # also sets cudnn.deterministic=True, cudnn.benchmark=False
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


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
