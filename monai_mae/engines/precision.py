"""Mixed precision on every device: bf16 autocast for CPU training and inference.

MONAI's engines open ``torch.autocast("cuda")`` when ``amp=True``, so on a CPU their ``amp`` flag does
nothing useful. The bundles therefore pass ``amp`` to the engine only on CUDA and, on a CPU, wrap
the inferer in :class:`AutocastInferer` (``torch.autocast("cpu", dtype=torch.bfloat16)``) instead:
``--amp true`` means bf16 autocast on both. On a CPU, bf16 pays only where the hardware has bf16
matrix instructions (AVX512-BF16 or AMX, e.g. Intel Sapphire Rapids or AMD Zen 4 and later);
elsewhere PyTorch emulates it and a step gets slower, which :func:`amp_inferer` warns about.

One function decides the autocast dtype everywhere (:func:`amp_dtype`: every engine, inferer and bundle config
names it): bf16 on a CPU and on CUDA GPUs with native bf16 (compute capability 8.0 and later: A100, H100, ...),
fp16 on older GPUs (V100, T4), where ``torch.cuda.is_bf16_supported()`` says yes because it counts emulation.
fp16 needs loss scaling, bf16 does not: :class:`AmpGradScaler` gives MONAI's trainer a disabled ``GradScaler``
for bf16 (no scaling, no inf check, no host sync per step).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer

__all__ = [
    "AmpGradScaler", "AutocastInferer", "amp_dtype", "amp_inferer", "cpu_bf16_supported", "cuda_bf16_supported",
    "engine_amp",
]  # fmt: skip

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16).

    Reads oneDNN's own check where PyTorch exposes it, else the flags of ``/proc/cpuinfo`` (Linux).
    """
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        if check is not None and check():
            return True
    except RuntimeError:  # an op that this build lacks
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def cuda_bf16_supported(device: str | torch.device = "cuda") -> bool:
    """Whether the CUDA GPU ``device`` computes bf16 natively (compute capability >= 8.0, Ampere and later).

    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is emulated (V100, T4: slower than fp16); this
    is its ``including_emulation=False`` answer, for the GPU named by ``device`` (not only the current one).
    False without CUDA.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def amp_dtype(device: str | torch.device) -> torch.dtype:
    """The autocast dtype for ``device``: bf16 on a CPU and on GPUs with native bf16, fp16 on older GPUs.

    Example:
        >>> amp_dtype("cpu")
        torch.bfloat16
    """
    device = torch.device(device)
    if device.type == "cuda" and not cuda_bf16_supported(device):
        return torch.float16
    return torch.bfloat16


class AmpGradScaler:
    """Give a MONAI ``SupervisedTrainer`` the ``GradScaler`` its autocast dtype needs.

    MONAI's trainer builds a CUDA ``GradScaler`` whenever ``amp`` is on, whatever the dtype. Loss scaling
    keeps fp16 gradients from underflowing; bf16 has fp32's range and needs none, and an enabled scaler costs
    a host sync per step (it reads back whether a gradient was inf/NaN). At ``Events.STARTED`` (after
    ``run()`` built its scaler) this replaces it with ``torch.amp.GradScaler(device_type, enabled=dtype is
    fp16)``: a disabled scaler passes the loss and the step through unchanged. Does nothing when the
    trainer's ``amp`` is off.

    Args:
        dtype: the trainer's autocast dtype (``amp_kwargs["dtype"]``); None: :func:`amp_dtype` of the trainer's
            device.
        device_type: the scaler's device type. Defaults to ``"cuda"`` (what MONAI's engines autocast).

    Raises:
        ValueError: for a dtype other than bf16 / fp16.
    """

    def __init__(self, dtype: torch.dtype | None = None, device_type: str = "cuda") -> None:
        if dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or None, got {dtype!r}.")
        self.dtype = dtype
        self.device_type = device_type

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not getattr(engine, "amp", False):
            return
        dtype = self.dtype or amp_dtype(engine.state.device)
        engine.scaler = torch.amp.GradScaler(self.device_type, enabled=dtype == torch.float16)


def _to_float32(value: Any) -> Any:
    """Cast the low-precision floating tensors of a (nested) inferer output to float32, leave the rest."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple
        return type(value)(*(_to_float32(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value


class AutocastInferer(Inferer):
    """Run another MONAI inferer under ``torch.autocast`` and hand back float32 outputs.

    The loss and the metrics then see float32 as without autocast, while the network's matrix
    products run in ``dtype``. Meant for the CPU (on CUDA, MONAI's engines' own ``amp`` does this).

    Args:
        inferer: the inferer to wrap (e.g. ``SimpleInferer()`` or a ``SlidingWindowInferer``).
        device_type: ``"cpu"`` (or ``"cuda"``), the autocast device type.
        dtype: the autocast dtype, bf16 by default.
        enabled: ``False`` runs ``inferer`` unchanged.

    Example:
        >>> import torch
        >>> from monai.inferers import SimpleInferer
        >>> net = torch.nn.Linear(4, 2)
        >>> out = AutocastInferer(SimpleInferer())(torch.ones(3, 4), net)
        >>> out.dtype, out.shape
        (torch.float32, torch.Size([3, 2]))
    """

    def __init__(
        self, inferer: Inferer, device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16, enabled: bool = True
    ) -> None:
        if not callable(inferer):
            raise ValueError(f"inferer must be a MONAI inferer (callable), got {type(inferer).__name__}.")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}.")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}.")
        self.inferer = inferer
        self.device_type = device_type
        self.dtype = dtype
        self.enabled = bool(enabled)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            output = self.inferer(inputs, network, *args, **kwargs)
        return _to_float32(output)

    def __repr__(self) -> str:
        return f"AutocastInferer({self.inferer!r}, device_type={self.device_type!r}, dtype={self.dtype}, enabled={self.enabled})"


def engine_amp(device: str | torch.device, amp: bool) -> bool:
    """The ``amp`` to give MONAI's engines: ``amp`` on CUDA, ``False`` elsewhere (see :func:`amp_inferer`)."""
    return bool(amp) and torch.device(device).type == "cuda"


def amp_inferer(inferer: Inferer, device: str | torch.device, amp: bool) -> Inferer:
    """``inferer`` as the bundles use it: wrapped in bf16 :class:`AutocastInferer` when ``amp`` is on and ``device`` is a CPU.

    On CUDA (or with ``amp`` off) ``inferer`` comes back unchanged: there MONAI's engines' ``amp`` applies.
    Warns once when the CPU has no native bf16 instructions (autocast then runs, but slower than fp32).
    """
    if not isinstance(amp, bool):
        raise ValueError(f"amp must be true or false, got {amp!r}.")
    device_type = torch.device(device).type
    if not amp or device_type == "cuda":
        return inferer
    if device_type != "cpu":
        raise ValueError(f"amp is supported on 'cpu' and 'cuda' devices, got device {str(device)!r}.")
    if not cpu_bf16_supported():
        warnings.warn(
            "amp=true on a CPU without AVX512-BF16/AMX: bf16 autocast is emulated and usually slower than fp32 here; "
            "set amp to false on this machine.",
            RuntimeWarning,
            stacklevel=2,
        )
    return AutocastInferer(inferer, device_type="cpu", dtype=amp_dtype(device))
