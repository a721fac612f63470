"""Pieces the benchmark scripts share: FLOP counting that includes PyTorch's fused CPU attention, the CPU's name,
and the peak dense bf16 FLOP/s of known GPUs (for the MFU).

``FlopCounterMode`` knows the CUDA attention kernels but not the CPU flash kernel that SDPA runs here; it
is counted with the same formulas, so its backward includes the recomputed scores.
"""

from __future__ import annotations

import platform

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["PEAK_BF16_TFLOPS", "cpu_name", "flop_counter", "fmt_optional", "peak_bf16_flops"]

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


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
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

