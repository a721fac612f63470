"""Seeds and backend flags (``seed_and_backends``) and the DataLoader workers from the CPUs this process may use."""

from __future__ import annotations

import pytest
import torch

from monai_mae.engines import runtime


@pytest.fixture
def _restore_backends():
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)  # fmt: skip
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved  # fmt: skip


@pytest.mark.parametrize("deterministic", [False, True])
def test_seeds_always_and_determinism_only_when_asked(deterministic, _restore_backends):
    runtime.seed_and_backends(7, deterministic, "cpu")
    first = torch.rand(3)
    runtime.seed_and_backends(7, deterministic, "cpu")
    assert torch.equal(torch.rand(3), first)  # seeded either way
    assert torch.backends.cudnn.deterministic is deterministic and torch.backends.cudnn.benchmark is not deterministic


@pytest.mark.parametrize("device, deterministic, tf32", [("cuda:0", False, True), ("cuda:1", True, False)])
def test_tf32_matmuls_on_cuda_unless_deterministic(device, deterministic, tf32, _restore_backends):
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    runtime.seed_and_backends(0, deterministic, device)  # only flags: no GPU needed
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32


def test_a_cpu_run_leaves_tf32_alone(_restore_backends):
    torch.backends.cuda.matmul.allow_tf32 = False
    runtime.seed_and_backends(0, False, "cpu")
    assert torch.backends.cuda.matmul.allow_tf32 is False
    with pytest.raises(ValueError, match="deterministic must be true or false, got 'yes'"):
        runtime.seed_and_backends(0, "yes")


def test_available_cpus_follows_the_affinity_mask_and_the_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 64)
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(runtime, "_CGROUP_CPU_MAX", str(quota))
    assert runtime.available_cpus() == 6  # no cgroup file: the affinity mask, not the machine's 64
    quota.write_text("max 100000\n")
    assert runtime.available_cpus() == 6
    quota.write_text("250000 100000\n")  # 2.5 CPUs -> 3
    assert runtime.available_cpus() == 3
    monkeypatch.delattr(runtime.os, "sched_getaffinity")
    quota.write_text("max 100000\n")
    assert runtime.available_cpus() == 64  # no affinity call on this platform: the CPU count


def test_default_num_workers_share_the_cpus_between_local_processes(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 12)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert runtime.default_num_workers("cuda:0") == 8 and runtime.default_num_workers("cpu") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.default_num_workers("cuda:3") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert runtime.default_num_workers(torch.device("cuda", 0)) == 1
