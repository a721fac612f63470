"""Pieces the benchmark scripts share: FLOP counting that includes PyTorch's fused CPU attention, and the CPU's name.

``FlopCounterMode`` knows the CUDA attention kernels but not the CPU flash kernel that SDPA runs here; it
is counted with the same formulas, so its backward includes the recomputed scores.
"""

from __future__ import annotations

import platform

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["cpu_name", "flop_counter"]


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
