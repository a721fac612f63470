"""Pieces the benchmark scripts share: where results and figures go, FLOP counting that includes PyTorch's fused
CPU attention, the CPU's name, the load average, this process's memory, step timing (CUDA synchronised), and the
peak dense bf16 FLOP/s of known GPUs (for the MFU).

Every benchmark writes its results (JSON, CSV, markdown) under ``benchmarks/results/`` (:data:`RESULTS`) and its
figures under ``benchmarks/figures/`` (:data:`FIGURES`).

``FlopCounterMode`` knows the CUDA attention kernels but not the CPU flash kernel that SDPA runs here; it
is counted with the same formulas, so its backward includes the recomputed scores.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = [
    "FIGURES",
    "GIB",
    "MIB",
    "PEAK_BF16_TFLOPS",
    "RESULTS",
    "cpu_name",
    "flop_counter",
    "fmt_optional",
    "load_average",
    "load_average_1min",
    "median_seconds",
    "peak_bf16_flops",
    "peak_rss_mib",
    "proc_status_mib",
    "reset_peak_rss",
    "sync",
    "time_calls",
]

#: Where the benchmarks write their results (JSON, CSV, markdown reports) and their figures.
RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = Path(__file__).resolve().parent / "figures"

MIB = 1024**2
GIB = 1024**3

#: Peak dense (no sparsity) bf16 tensor-core TFLOP/s by the exact name ``torch.cuda.get_device_name`` gives.
#: One marketing name covers parts with different clocks and power: an H100 SXM peaks at 989, the PCIe card at
#: 756 and the NVL card at 835, so a device is matched by its full name only; any other device gets no MFU.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CPU_ATTENTION_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` (use as a context manager, then ``get_total_flops()``) that also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FORMULAS)


def cpu_name() -> str:
    """The ``model name`` line of ``/proc/cpuinfo`` (``platform.processor()`` or the machine type elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU named ``device_name`` (exactly as CUDA reports it), or None when unknown."""
    tflops = PEAK_BF16_TFLOPS.get(device_name.strip())
    return None if tflops is None else tflops * 1e12


def fmt_optional(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``"n/a"`` when it was not measured."""
    return "n/a" if value is None else format(value, spec)


# ----------------------------------------------------------------------------------------------- machine
def load_average() -> list[float]:
    """1, 5 and 15 minute load averages, rounded to 2 decimals (NaN where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return [math.nan] * 3


def load_average_1min() -> str:
    """The 1-minute load average as text (``"0.84"``), or ``"n/a"`` where the OS has none."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


# ----------------------------------------------------------------------------------------------- memory
def proc_status_mib(key: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; NaN where there is none."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def peak_rss_mib() -> float:
    """Peak RSS of this process in MiB: ``VmHWM``, else ``ru_maxrss`` (kB on Linux, bytes on macOS)."""
    peak = proc_status_mib("VmHWM")
    if math.isnan(peak):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss / MIB if sys.platform == "darwin" else maxrss / 1024
    return peak


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0, ``echo 5 > /proc/self/clear_refs``); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    """Wait for the queued work of ``device`` (a CUDA device; nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(run: Callable[[], object], repeats: int, device: torch.device | None = None) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls of ``run``, ``device`` synchronised before and after each."""
    device = torch.device("cpu") if device is None else device
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_seconds(run: Callable[[], object], repeats: int, device: torch.device | None = None) -> float:
    """Median of :func:`time_calls` (``repeats`` timed calls of ``run``)."""
    return statistics.median(time_calls(run, repeats, device))
