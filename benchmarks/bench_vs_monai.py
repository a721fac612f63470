"""Benchmark ``monai_mae.MAEViT`` against MONAI's ``MaskedAutoEncoderViT`` on CPU (or whatever torch runs on).

Both networks are built with the same architecture (same constructor arguments, same number of
weights) and trained on the same random input in one process, their steps interleaved
(MONAI, MAEViT, MONAI, MAEViT, ...) so that machine noise hits both alike. Config ``c`` instead gives
MAEViT its Primus-style block options (RoPE, SwiGLU, LayerScale, no class token), which MONAI's
class does not have: the same widths and depths, not the same architecture. A model that runs out of
memory is reported as such. Printed as markdown:

* training step time: forward + masked loss + backward + AdamW step (fused kernel for both models, as
  ``build_optimizer`` picks; ``--no-fused-adamw``: torch's per-tensor loop), median over ``--steps`` timed
  steps after ``--warmup`` untimed ones;
* step peak memory: measured in a fresh subprocess per (config, model) as peak RSS (``VmHWM``)
  minus the RSS once the model, optimiser, loss and input exist; the raw peak is printed too;
* the speedup of encoding only the visible 25% of the tokens over encoding all of them (MAEViT
  encoder forward + backward);
* the FLOP rate of each model's training step (FLOPs counted with ``FlopCounterMode``, divided by
  the median step time) as a fraction of a plain fp32 ``torch.mm``'s rate measured in the same run;
* CPU bfloat16 autocast (``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and loss): both
  classes are tried; a class that fails under autocast is reported with its error instead of stopping
  the run. Steps under autocast are timed (interleaved with the fp32 ones; their matmul fraction is
  against a bf16 ``torch.mm``) when the CPU has native bf16 matrix instructions (``avx512_bf16`` or
  AMX; ``--bf16 on`` forces it): without them bf16 matrix products fall back to slow loops, and only the
  autocast check runs, on the config's miniature (``--quick`` size).

The long-sequence configs (4096 tokens: ``b``, ``c``) get a summary table: MAEViT / MONAI step time,
speedup and matmul fraction in fp32 and under bf16 autocast.

``--decoders`` times only MAEViT instead, once per decoder (:data:`DECODER_VARIANTS`: the self-attention
decoder, and the opt-in cross-attention decoder reconstructing every masked patch or a random quarter of
them), same widths and depths, steps interleaved; step time and ratio to the self-attention decoder.

Examples::

    python benchmarks/bench_vs_monai.py --quick                  # smoke run, < 1 minute
    python benchmarks/bench_vs_monai.py --steps 8 --warmup 2 --json   # -> benchmarks/results/bench_vs_monai.json
    python benchmarks/bench_vs_monai.py --configs b --threads 2
    python benchmarks/bench_vs_monai.py --configs c --steps 3 --warmup 1   # long sequence, block options
    python benchmarks/bench_vs_monai.py --configs b c --threads 1 --bf16 auto --no-memory
    python benchmarks/bench_vs_monai.py --configs c --decoders --threads 1 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import monai
import torch
import torch.nn as nn
from monai.networks.nets import MaskedAutoEncoderViT

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.engines import cpu_bf16_supported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared helpers
from bench_common import (  # noqa: E402
    RESULTS,
    cpu_name,
    flop_counter,
    load_average_1min,
    peak_rss_mib,
    proc_status_mib,
    time_calls,
)

__all__ = [
    "BenchConfig",
    "CONFIGS",
    "build_model",
    "build_models",
    "make_input",
    "train_step",
    "autocast_context",
    "autocast_check",
    "cpu_bf16_support",
    "first_steps",
    "is_out_of_memory",
    "encoder_step",
    "time_interleaved",
    "peak_memory_child",
    "flops_per_step",
    "matmul_gflops",
    "DECODER_VARIANTS",
    "run_decoder_variants",
    "main",
]

MONAI = "monai"
OURS = "monai_mae"
MODEL_LABELS = {MONAI: "MONAI MaskedAutoEncoderViT", OURS: "monai_mae MAEViT"}
BF16_SUFFIX = "@bf16"  # key of a model's variant trained under CPU bfloat16 autocast
LONG_SEQUENCE_CONFIGS = ("b", "c")  # 4096 tokens (their --quick miniatures: 512): the summary table
MODEL_CLASSES: dict[str, type[nn.Module]] = {MONAI: MaskedAutoEncoderViT, OURS: MAEViT}
#: ``--decoders``: MAEViT decoder options timed side by side (the first is the reference)
DECODER_VARIANTS: dict[str, dict[str, Any]] = {
    "self-attention": {},
    "cross, predict 1.0": {"decoder_type": "cross", "decoder_predict_ratio": 1.0},
    "cross, predict 0.25": {"decoder_type": "cross", "decoder_predict_ratio": 0.25},
}
PAPER_ENCODER_SPEEDUP = 3.0  # MAE paper: encoding the visible 25% only trains >= 3x faster


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark setting: architecture, input and the targets MAEViT should meet against MONAI.

    Attributes:
        name: short key (``--configs``).
        title: one-line description for the table.
        img_size: cubic volume side ``S``.
        patch_size: cubic patch side ``P``.
        batch_size: volumes per step.
        hidden_size, mlp_dim, num_layers, num_heads: encoder.
        decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads: decoder.
        in_channels: input channels.
        masking_ratio: fraction of patches masked.
        speed_target: MAEViT must be at least this many times faster (``None``: no target).
        memory_target: MAEViT's step peak memory must be at least this many times smaller.
        encoder_target: encoding the visible tokens only must be at least this many times faster than all.
        qkv_bias: bias on the qkv projections (both models).
        ours_options: MAEViT-only constructor arguments as ``(name, value)`` pairs (block options MONAI's
            class lacks, or a value that replaces a shared one such as ``mlp_dim``); when set, the two
            models are not the same architecture and their weight counts may differ.
    """

    name: str
    title: str
    img_size: int
    patch_size: int
    batch_size: int
    hidden_size: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    decoder_hidden_size: int
    decoder_mlp_dim: int
    decoder_num_layers: int
    decoder_num_heads: int
    in_channels: int = 1
    masking_ratio: float = 0.75
    speed_target: float | None = None
    memory_target: float | None = None
    encoder_target: float | None = None
    qkv_bias: bool = False
    ours_options: tuple[tuple[str, Any], ...] = ()

    @property
    def num_tokens(self) -> int:
        """Patches per volume ``N = (S / P)^3``."""
        return (self.img_size // self.patch_size) ** 3

    @property
    def num_visible(self) -> int:
        """Visible patches per volume, counted as both models count them."""
        return int(self.num_tokens * (1 - self.masking_ratio))

    def model_kwargs(self) -> dict[str, Any]:
        """Constructor arguments shared by ``MaskedAutoEncoderViT`` and ``MAEViT``."""
        return {
            "in_channels": self.in_channels,
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "mlp_dim": self.mlp_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "masking_ratio": self.masking_ratio,
            "decoder_hidden_size": self.decoder_hidden_size,
            "decoder_mlp_dim": self.decoder_mlp_dim,
            "decoder_num_layers": self.decoder_num_layers,
            "decoder_num_heads": self.decoder_num_heads,
            "qkv_bias": self.qkv_bias,
        }

    def kwargs_for(self, name: str) -> dict[str, Any]:
        """Constructor arguments of model ``name``: the shared ones, plus :attr:`ours_options` for MAEViT."""
        return {**self.model_kwargs(), **dict(self.ours_options)} if name == OURS else self.model_kwargs()


CONFIGS: dict[str, BenchConfig] = {
    cfg.name: cfg
    for cfg in (
        BenchConfig(
            name="a",
            title="ViT-B/16, 96^3, batch 2",
            img_size=96,
            patch_size=16,
            batch_size=2,
            hidden_size=768,
            mlp_dim=3072,
            num_layers=12,
            num_heads=12,
            # the paper's decoder is 512 wide; MONAI's 3D sin-cos table needs width % 6 == 0
            decoder_hidden_size=384,
            decoder_mlp_dim=1536,
            decoder_num_layers=8,
            decoder_num_heads=12,
            speed_target=1.15,
            encoder_target=PAPER_ENCODER_SPEEDUP,
        ),
        BenchConfig(
            name="b",
            title="ViT-S-ish/8, 128^3 (4096 tokens), batch 1",
            img_size=128,
            patch_size=8,
            batch_size=1,
            hidden_size=384,
            mlp_dim=1536,
            num_layers=6,
            num_heads=6,
            decoder_hidden_size=384,
            decoder_mlp_dim=1536,
            decoder_num_layers=4,
            decoder_num_heads=12,
            speed_target=3.0,
            memory_target=3.0,
            encoder_target=PAPER_ENCODER_SPEEDUP,
        ),
        BenchConfig(
            name="c",
            title="384 x 6 + decoder 288 x 4, patch 8, 128^3 (4096 tokens), batch 1; MAEViT: RoPE, SwiGLU, "
            "LayerScale 0.1, no class token (MONAI's class has none: GELU MLP, sin-cos table, class token)",
            img_size=128,
            patch_size=8,
            batch_size=1,
            hidden_size=384,
            mlp_dim=1536,
            num_layers=6,
            num_heads=6,
            decoder_hidden_size=288,
            decoder_mlp_dim=1152,
            decoder_num_layers=4,
            decoder_num_heads=6,
            qkv_bias=True,
            # SwiGLU with 8/3 x width hidden units holds the weights of MONAI's 4 x width GELU MLP (as Primus)
            ours_options=(
                ("pos_embed_type", "rope"),
                ("mlp_type", "swiglu"),
                ("layer_scale_init", 0.1),
                ("cls_token", False),
                ("mlp_dim", 1024),
                ("decoder_mlp_dim", 768),
            ),
        ),
        # --quick: the same shapes in miniature (no targets)
        BenchConfig("a-quick", "smoke: 32^3, patch 8, batch 2", 32, 8, 2, 96, 384, 2, 4, 48, 192, 2, 4),
        BenchConfig("b-quick", "smoke: 32^3, patch 4 (512 tokens), batch 1", 32, 4, 1, 48, 192, 2, 2, 48, 192, 1, 4),
        BenchConfig(
            "c-quick",
            "smoke: 32^3, patch 4 (512 tokens), batch 1, MAEViT block options",
            32,
            4,
            1,
            48,
            192,
            2,
            2,
            48,
            192,
            1,
            4,
            qkv_bias=True,
            ours_options=(
                ("pos_embed_type", "rope"),
                ("mlp_type", "swiglu"),
                ("layer_scale_init", 0.1),
                ("cls_token", False),
                ("mlp_dim", 128),
                ("decoder_mlp_dim", 128),
            ),
        ),  # fmt: skip
    )
}


@dataclass
class Timing:
    """Step times in seconds of one callable."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class ModelResult:
    """Everything measured for one (config, model); ``error`` says why a model has no timings (out of memory)."""

    model: str
    params: int
    step_times_s: list[float]
    step_median_s: float
    flops_per_step: int
    gflops_per_s: float
    fraction_of_matmul: float
    error: str = ""
    precision: str = "fp32"
    peak_rss_mib: float = float("nan")
    rss_after_build_mib: float = float("nan")
    step_peak_mib: float = float("nan")


@dataclass
class ConfigResult:
    """Both models on one config, the ratios, and MAEViT's visible-only encoder speedup.

    ``models`` holds the fp32 runs under ``"monai"`` / ``"monai_mae"`` and, when bf16 steps were timed,
    the autocast runs under ``"monai@bf16"`` / ``"monai_mae@bf16"``. ``autocast_errors`` maps each model
    name to ``""`` (a training step under CPU bf16 autocast works) or the error it raised, checked at
    config ``autocast_checked_at`` (this config, or its miniature when bf16 steps were not timed).
    """

    config: BenchConfig
    models: dict[str, ModelResult] = field(default_factory=dict)
    speedup: float = float("nan")
    best_speedup: float = float("nan")
    memory_ratio: float = float("nan")
    encoder_masked_times_s: list[float] = field(default_factory=list)
    encoder_full_times_s: list[float] = field(default_factory=list)
    encoder_speedup: float = float("nan")
    autocast_errors: dict[str, str] = field(default_factory=dict)
    autocast_checked_at: str = ""
    bf16_timed: bool = False


# ----------------------------------------------------------------------------------------------- building
def build_model(config: BenchConfig, name: str, seed: int = 0) -> nn.Module:
    """One model (``"monai"`` or ``"monai_mae"``) of ``config`` in train mode, seeded."""
    torch.manual_seed(seed)
    return MODEL_CLASSES[name](**config.kwargs_for(name)).train()


def build_models(config: BenchConfig, seed: int = 0) -> dict[str, nn.Module]:
    """MONAI's and monai_mae's model of ``config``, both in train mode.

    Raises:
        ValueError: if the two do not hold the same number of weights (they should be the same architecture;
            not checked when ``config.ours_options`` gives MAEViT options MONAI's class lacks).
    """
    models = {name: build_model(config, name, seed) for name in (MONAI, OURS)}
    counts = {name: count_params(model) for name, model in models.items()}
    if counts[MONAI] != counts[OURS] and not config.ours_options:
        raise ValueError(f"config {config.name}: parameter counts differ, {counts}.")
    return models


def count_params(model: nn.Module) -> int:
    """Every weight the model holds, trainable or not (MAEViT freezes the cross-attention norms that MONAI's
    ``TransformerBlock`` builds but never uses, and MONAI leaves them trainable; neither ever gets a gradient)."""
    return sum(p.numel() for p in model.parameters())


def make_input(config: BenchConfig, seed: int = 0) -> torch.Tensor:
    """``(B, C, S, S, S)`` standard-normal volumes, the same for every model."""
    generator = torch.Generator().manual_seed(seed)
    shape = (config.batch_size, config.in_channels, *(config.img_size,) * 3)
    return torch.randn(shape, generator=generator)


def make_optimizer(model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW with the MAE paper's pretraining settings (values do not matter for speed).

    Args:
        fused: use torch's fused AdamW kernel instead of its default implementation (a per-tensor loop on CPU).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1.5e-4, weight_decay=0.05, fused=fused or None)


# ----------------------------------------------------------------------------------------------- steps
def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype=torch.bfloat16)`` when ``bf16``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: MaskedReconstructionLoss,
    images: torch.Tensor,
    masking_ratio: float,
    bf16: bool = False,
) -> float:
    """One training step: forward, masked loss, backward, optimiser step.

    Args:
        images: ``(B, C, H, W, D)``.
        bf16: run forward and loss under bfloat16 autocast (the backward pass follows the forward's dtypes).

    Returns:
        the loss value.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(images.device, bf16):
        loss = loss_fn(model(images, masking_ratio), images)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def encoder_step(model: MAEViT, images: torch.Tensor, masking_ratio: float) -> None:
    """MAEViT encoder forward + backward on the visible tokens (``masking_ratio=0``: all tokens).

    Args:
        images: ``(B, C, H, W, D)``.
    """
    model.zero_grad(set_to_none=True)
    latent = model.forward_encoder(images, masking_ratio=masking_ratio)  # (B, prefix + N_keep, D), prefix 0 or 1
    latent.float().pow(2).mean().backward()


def time_interleaved(steps: dict[str, Callable[[], object]], n_steps: int, warmup: int) -> dict[str, Timing]:
    """Run the callables in turn (A, B, A, B, ...), ``warmup`` untimed rounds then ``n_steps`` timed ones.

    Returns:
        per name, the ``n_steps`` wall-clock times in seconds.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + n_steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: Timing(values) for name, values in times.items()}


# ----------------------------------------------------------------------------------------------- FLOPs
def flops_per_step(
    model: nn.Module, loss_fn: MaskedReconstructionLoss, images: torch.Tensor, masking_ratio: float, bf16: bool = False
) -> int:
    """Matmul/conv/attention FLOPs of one forward + loss + backward (the optimiser's elementwise work is not counted).

    Fused CPU attention is counted like the CUDA kernels, so its backward includes the recomputed scores.
    """
    model.zero_grad(set_to_none=True)
    with flop_counter() as counter:
        with autocast_context(images.device, bf16):
            loss = loss_fn(model(images, masking_ratio), images)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_gflops(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> tuple[float, list[float]]:
    """Rate of a plain ``torch.mm`` of two ``size x size`` matrices (fp32 unless ``dtype``).

    Returns:
        ``(GFLOP/s of the median time, all times in seconds)``.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    times = time_calls(lambda: torch.mm(a, b, out=out), repeats)
    return 2 * size**3 / statistics.median(times) / 1e9, times


# ----------------------------------------------------------------------------------------------- bf16
def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU has native bfloat16 matrix instructions, and a one-line account of what was seen.

    Native is :func:`monai_mae.engines.cpu_bf16_supported` (oneDNN's check, else the ``avx512_bf16`` /
    ``amx_bf16`` flags of ``/proc/cpuinfo``), the check the bundles warn with. Without them torch's CPU
    bf16 matrix products fall back to slow reference loops.
    """
    native = cpu_bf16_supported()
    text = (
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{'native bf16 (AVX512-BF16 / AMX)' if native else 'without avx512_bf16 / amx_bf16 (bf16 emulated)'}"
    )
    return native, text


def _short_error(error: BaseException, limit: int = 120) -> str:
    """``"Type: first line of the message"``, cut to ``limit`` characters."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:limit]}"


def autocast_check(config: BenchConfig, name: str) -> str:
    """One training step of model ``name`` at ``config``'s size under CPU bfloat16 autocast.

    Returns:
        ``""`` when it runs, else the error it raised as ``"Type: message"`` (the benchmark goes on).
    """
    model = build_model(config, name)
    optimizer = make_optimizer(model)
    loss_fn = MaskedReconstructionLoss(config.patch_size, spatial_dims=3)
    try:
        train_step(model, optimizer, loss_fn, make_input(config), config.masking_ratio, bf16=True)
    except Exception as error:  # noqa: BLE001 - any failure under autocast is a finding to report
        return _short_error(error)
    return ""


# ----------------------------------------------------------------------------------------------- memory
def measure_memory(config: BenchConfig, name: str, n_steps: int, fused_adamw: bool = False) -> dict[str, float]:
    """In this process: build one model, then run ``n_steps`` training steps; RSS figures in MiB.

    Only meaningful in a fresh process (see :func:`peak_memory_child`).
    """
    model = build_model(config, name)
    optimizer = make_optimizer(model, fused_adamw)
    loss_fn = MaskedReconstructionLoss(config.patch_size, spatial_dims=3)
    images = make_input(config)
    gc.collect()
    rss_after_build = proc_status_mib("VmRSS")
    for _ in range(n_steps):
        train_step(model, optimizer, loss_fn, images, config.masking_ratio)
    peak = peak_rss_mib()
    return {"rss_after_build_mib": rss_after_build, "peak_rss_mib": peak, "step_peak_mib": peak - rss_after_build}


def peak_memory_child(
    config: BenchConfig, name: str, threads: int, n_steps: int = 2, fused_adamw: bool = False
) -> dict[str, float]:
    """Run :func:`measure_memory` in a fresh interpreter (this script with the hidden ``--child`` flag).

    Raises:
        RuntimeError: if the child fails; the message carries its stderr.
    """
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        config.name,
        name,
        "--threads",
        str(threads),
        "--child-steps",
        str(n_steps),
        "--fused-adamw" if fused_adamw else "--no-fused-adamw",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {config.name}/{name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- running
def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA or CPU allocator, or Python's ``MemoryError``)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def first_steps(models: dict[str, nn.Module], step: Callable[[str], object]) -> dict[str, str]:
    """One untimed training step of each model; returns ``{name: error}`` for those out of memory.

    Raises:
        BaseException: any error of a step that is not an allocation failure.
    """
    failed = {}
    for name in list(models):
        try:
            step(name)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            failed[name] = "out of memory: " + str(error).strip().splitlines()[0][:160]
            gc.collect()
    return failed


def run_config(
    config: BenchConfig,
    n_steps: int,
    warmup: int,
    threads: int,
    matmul_rate: float,
    memory: bool = True,
    fused_adamw: bool = False,
    bf16: bool = False,
    bf16_matmul_rate: float = float("nan"),
    smoke_config: BenchConfig | None = None,
) -> ConfigResult:
    """All measurements for one config: interleaved training steps, FLOPs, encoder speedup, memory.

    The first warm-up round runs each model alone; a model out of memory there is reported
    (``ModelResult.error``) and left out of the rest, whose ratios are then NaN.

    Args:
        bf16: also time each model under CPU bfloat16 autocast (keys ``"<model>@bf16"``, interleaved with
            the fp32 steps, separate weights and optimiser); a model that fails under autocast is reported
            in ``autocast_errors`` and left out. Without it, autocast is only checked with one step at
            ``smoke_config`` (default: ``config``).
        bf16_matmul_rate: GFLOP/s of a bf16 ``torch.mm``, the reference of the bf16 steps' matmul fraction.
    """
    models = build_models(config)
    images = make_input(config)
    loss_fn = MaskedReconstructionLoss(config.patch_size, spatial_dims=3)
    ratio = config.masking_ratio
    result = ConfigResult(config)
    nan = float("nan")
    precision = {name: False for name in models}  # key -> under bf16 autocast
    if bf16:
        result.bf16_timed = True
        result.autocast_checked_at = config.name
        for name in (MONAI, OURS):
            models[name + BF16_SUFFIX] = build_model(config, name)
            precision[name + BF16_SUFFIX] = True
    else:
        check_at = smoke_config or config
        result.autocast_checked_at = check_at.name
        result.autocast_errors = {name: autocast_check(check_at, name) for name in (MONAI, OURS)}
    optimizers = {key: make_optimizer(model, fused_adamw) for key, model in models.items()}

    def stepper(key: str) -> Callable[[], float]:
        return lambda: train_step(models[key], optimizers[key], loss_fn, images, ratio, bf16=precision[key])  # noqa: F821 - deleted after the closure's last call

    for key in [k for k in models if precision[k]]:  # bf16 first steps: any error is a finding, not a crash
        name = key.removesuffix(BF16_SUFFIX)
        try:
            stepper(key)()
            result.autocast_errors[name] = ""
        except Exception as error:  # noqa: BLE001
            result.autocast_errors[name] = _short_error(error)
            print(f"config {config.name}: {MODEL_LABELS[name]} under bf16 autocast: {result.autocast_errors[name]}",
                  file=sys.stderr, flush=True)  # fmt: skip
            del models[key], optimizers[key]
            gc.collect()
    failed = first_steps({k: m for k, m in models.items() if not precision[k]}, lambda key: stepper(key)())
    for name, error in failed.items():
        result.models[name] = ModelResult(name, count_params(models[name]), [], nan, 0, nan, nan, error=error)
        print(f"config {config.name}: {MODEL_LABELS[name]} {error}", file=sys.stderr, flush=True)
        del models[name], optimizers[name]
    gc.collect()
    timings = time_interleaved({key: stepper(key) for key in models}, n_steps, max(warmup - 1, 0))
    for key, model in models.items():
        flops = flops_per_step(model, loss_fn, images, ratio, bf16=precision[key])
        rate = flops / timings[key].median / 1e9
        result.models[key] = ModelResult(
            model=key,
            params=count_params(model),
            step_times_s=timings[key].times,
            step_median_s=timings[key].median,
            flops_per_step=flops,
            gflops_per_s=rate,
            fraction_of_matmul=rate / (bf16_matmul_rate if precision[key] else matmul_rate),
            precision="bf16" if precision[key] else "fp32",
        )
    if not failed:
        result.speedup = timings[MONAI].median / timings[OURS].median
        result.best_speedup = min(timings[MONAI].times) / min(timings[OURS].times)

    ours = models.get(OURS)
    del models, optimizers
    gc.collect()
    if ours is not None:
        encoder = time_interleaved(
            {"masked": lambda: encoder_step(ours, images, ratio), "full": lambda: encoder_step(ours, images, 0.0)},  # noqa: F821 - deleted after the closure's last call
            n_steps,
            warmup,
        )
        result.encoder_masked_times_s = encoder["masked"].times
        result.encoder_full_times_s = encoder["full"].times
        result.encoder_speedup = encoder["full"].median / encoder["masked"].median
    del ours
    gc.collect()

    if memory:
        for name in (MONAI, OURS):
            if name in failed:
                continue
            try:
                figures = peak_memory_child(config, name, threads, fused_adamw=fused_adamw)
            except RuntimeError as error:  # e.g. the child killed by the kernel's out-of-memory killer
                result.models[name].error = "memory child failed: " + str(error).splitlines()[0]
                continue
            for key, value in figures.items():
                setattr(result.models[name], key, value)
        result.memory_ratio = result.models[MONAI].step_peak_mib / result.models[OURS].step_peak_mib
    return result


def run_decoder_variants(
    config: BenchConfig, n_steps: int, warmup: int, fused_adamw: bool = False
) -> dict[str, tuple[int, Timing]]:
    """MAEViT of ``config`` once per decoder of :data:`DECODER_VARIANTS`, training steps interleaved.

    Returns:
        per variant, its weight count and its ``n_steps`` step times (after ``warmup`` untimed rounds).
    """
    images = make_input(config)
    loss_fn = MaskedReconstructionLoss(config.patch_size, spatial_dims=3)
    models, optimizers = {}, {}
    for label, options in DECODER_VARIANTS.items():
        torch.manual_seed(0)
        models[label] = MAEViT(**config.kwargs_for(OURS), **options).train()
        optimizers[label] = make_optimizer(models[label], fused_adamw)

    def stepper(label: str) -> Callable[[], float]:
        return lambda: train_step(models[label], optimizers[label], loss_fn, images, config.masking_ratio)

    timings = time_interleaved({label: stepper(label) for label in models}, n_steps, warmup)
    return {label: (count_params(models[label]), timings[label]) for label in models}


def format_decoder_table(config: BenchConfig, results: dict[str, tuple[int, Timing]]) -> list[str]:
    """Markdown lines: one row per decoder variant, step time and its ratio to the first variant's."""
    reference = next(iter(results.values()))[1].median
    n_masked = config.num_tokens - config.num_visible
    lines = [
        "",
        f"MAEViT decoders at {config.name}: {config.title} ({config.num_tokens} tokens, {n_masked} masked)",
        "",
        "| decoder | weights (M) | step time (s) | step / self-attention step | speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, (params, timing) in results.items():
        ratio = timing.median / reference
        lines.append(f"| {label} | {params / 1e6:.2f} | {_fmt_times(timing.times)} | {ratio:.2f} | {1 / ratio:.2f}x |")
    return lines


# ----------------------------------------------------------------------------------------------- report
def _verdict(value: float, target: float | None) -> str:
    if target is None:
        return "-"
    if value != value:  # NaN: not measured (--no-memory) or a model without timings
        return f">= {target:g}x: not measured"
    return f">= {target:g}x: {'met' if value >= target else 'MISSED'}"


def _fmt_times(times: Sequence[float]) -> str:
    if not times:
        return "n/a"
    return f"{statistics.median(times):.3f} [{min(times):.3f}, {max(times):.3f}]"


def _model_label(key: str) -> str:
    name = key.removesuffix(BF16_SUFFIX)
    return MODEL_LABELS[name] + (", bf16 autocast" if key.endswith(BF16_SUFFIX) else "")


def _speedup_cell(res: ConfigResult, key: str) -> str:
    """MONAI's fp32 median step over this row's median (MAEViT fp32: also the fastest steps' ratio)."""
    if key == MONAI:
        return "1.00x"
    if key == OURS:
        return f"{res.speedup:.2f}x (best {res.best_speedup:.2f}x)"
    monai, row = res.models.get(MONAI), res.models.get(key)
    if monai is None or row is None:
        return "n/a"
    return f"{monai.step_median_s / row.step_median_s:.2f}x (vs MONAI fp32)"


def _pct(fraction: float) -> str:
    return "n/a" if fraction != fraction else f"{100 * fraction:.0f}%"


def _bf16_cell(res: ConfigResult, name: str) -> str:
    """What the long-sequence table says for ``name``'s bf16 step when it has no timing."""
    error = res.autocast_errors.get(name)
    where = "" if res.autocast_checked_at == res.config.name else f" (checked at {res.autocast_checked_at})"
    if error:
        return f"fails under CPU bf16 autocast: {error}{where}"
    if not res.bf16_timed:
        runs = f"; a training step under autocast runs{where}" if error == "" else ""
        return "not timed (no native bf16 on this CPU)" + runs
    return "n/a"


def format_long_sequence_table(results: Sequence[ConfigResult]) -> list[str]:
    """Markdown lines: MAEViT / MONAI step time, speedup and matmul fractions at fp32 and bf16 autocast,
    for the long-sequence configs (``b``, ``c`` and their miniatures) among ``results``."""
    rows = [res for res in results if res.config.name.split("-")[0] in LONG_SEQUENCE_CONFIGS]
    if not rows:
        return []
    lines = [
        "",
        "Long sequences: MAEViT against MONAI, fp32 and CPU bf16 autocast",
        "",
        "| config | tokens | precision | MONAI step (s) | MAEViT step (s) | MAEViT / MONAI step time | speedup "
        "| MONAI of matmul | MAEViT of matmul |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in rows:
        cfg = res.config
        for precision, suffix in (("fp32", ""), ("bf16 autocast", BF16_SUFFIX)):
            monai, ours = res.models.get(MONAI + suffix), res.models.get(OURS + suffix)
            reference, note = monai, ""
            if suffix and monai is None and ours is not None:  # MONAI fails under autocast: compare with its fp32 step
                reference, note = res.models.get(MONAI), " (vs MONAI fp32)"
            ratio = ours.step_median_s / reference.step_median_s if ours and reference else float("nan")
            cells = [
                f"{cfg.name}",
                f"{cfg.num_tokens}",
                precision,
                _fmt_times(monai.step_times_s) if monai else _bf16_cell(res, MONAI),
                _fmt_times(ours.step_times_s) if ours else _bf16_cell(res, OURS),
                "n/a" if ratio != ratio else f"{ratio:.2f}{note}",
                "n/a" if ratio != ratio else f"{1 / ratio:.2f}x{note}",
                _pct(monai.fraction_of_matmul) if monai else "n/a",
                _pct(ours.fraction_of_matmul) if ours else "n/a",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_report(
    results: Sequence[ConfigResult], env: dict[str, str], matmul_rate: float, bf16_matmul_rate: float = float("nan")
) -> str:
    """The markdown report: environment, training-step table, long-sequence summary, encoder table, notes."""
    lines = [
        "## monai_mae MAEViT vs MONAI MaskedAutoEncoderViT",
        "",
        f"- command: `{env['command']}`",
        f"- torch {env['torch']}, monai {env['monai']}, Python {env['python']}",
        f"- CPU: {env['cpu']} ({env['cores']} logical cores), torch threads: {env['threads']}",
        f"- plain fp32 torch.mm 2048x2048: {matmul_rate:.1f} GFLOP/s (median of 10)",
        f"- bf16: {env['bf16']}"
        + (
            f"; plain bf16 torch.mm: {bf16_matmul_rate:.1f} GFLOP/s ({env['bf16_matmul']})"
            if bf16_matmul_rate == bf16_matmul_rate
            else ""
        ),
        f"- training steps: median [min, max] of {env['steps']} timed steps after {env['warmup']} warm-up, "
        f"MONAI and MAEViT interleaved in one process; optimiser: {env['optimizer']}",
        f"- load average (1 min) at start / end: {env['load_start']} / {env['load_end']} "
        "(other processes on these cores make the timings noisy when it exceeds the thread count)",
        "",
        "| config | model | weights (M) | step time (s) | speedup | target | peak RSS (MiB) | step peak mem (MiB) "
        "| less memory | target | GFLOP/step | GFLOP/s | of matmul |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for res in results:
        cfg = res.config
        for name in (MONAI, OURS, MONAI + BF16_SUFFIX, OURS + BF16_SUFFIX):
            if name not in res.models:
                continue
            m = res.models[name]
            is_ours, is_bf16 = name == OURS, name.endswith(BF16_SUFFIX)
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"{cfg.name}: {cfg.title}",
                        _model_label(name),
                        f"{m.params / 1e6:.2f}",
                        _fmt_times(m.step_times_s) + (f" ({m.error})" if m.error else ""),
                        _speedup_cell(res, name),
                        _verdict(res.speedup, cfg.speed_target) if is_ours else "",
                        "-" if is_bf16 else f"{m.peak_rss_mib:.0f}",
                        "-" if is_bf16 else f"{m.step_peak_mib:.0f}",
                        "-" if is_bf16 else f"{res.memory_ratio:.2f}x" if is_ours else "1.00x",
                        _verdict(res.memory_ratio, cfg.memory_target) if is_ours else "",
                        f"{m.flops_per_step / 1e9:.1f}",
                        f"{m.gflops_per_s:.1f}",
                        _pct(m.fraction_of_matmul),
                    ]
                )
                + " |"
            )
        for name in (MONAI, OURS):
            if res.autocast_errors.get(name):
                lines.append(
                    f"| {cfg.name}: {cfg.title} | {_model_label(name + BF16_SUFFIX)} | | {_bf16_cell(res, name)} "
                    "| | | | | | | | | |"
                )
    lines += format_long_sequence_table(results)
    lines += [
        "",
        "MAEViT encoder, forward + backward: visible tokens only (75% masked) vs all tokens",
        "",
        "| config | tokens encoded (per volume) | visible only (s) | all tokens (s) | speedup | target (MAE paper) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for res in results:
        cfg = res.config
        lines.append(
            f"| {cfg.name}: {cfg.title} | {cfg.num_visible} vs {cfg.num_tokens} | {_fmt_times(res.encoder_masked_times_s)} "
            f"| {_fmt_times(res.encoder_full_times_s)} | {res.encoder_speedup:.2f}x "
            f"| {_verdict(res.encoder_speedup, cfg.encoder_target)} |"
        )
    lines += [
        "",
        "Notes:",
        "- speedup = MONAI median step time / MAEViT median step time (best: ratio of the fastest steps); less memory = MONAI step peak memory / "
        "MAEViT step peak memory.",
        "- step peak mem = peak RSS (VmHWM) of a fresh process running 2 training steps minus its RSS after "
        "building model, AdamW, loss and input (so it includes gradients and AdamW state, the same for both).",
        "- a, b: decoder width is 384, not the MAE paper's 512: MONAI's 3D sin-cos table needs the width divisible "
        "by 6 (MAEViT builds sin-cos tables for any width).",
        "- GFLOP/step: forward + backward FLOPs from torch.utils.flop_counter.FlopCounterMode; fused attention "
        "(MAEViT) is counted like the CUDA kernels, so its backward includes the recomputed scores. "
        "'of matmul' = GFLOP/s / the torch.mm rate above (fp32 steps: the fp32 rate; bf16 autocast steps: the "
        "bf16 rate).",
        "- bf16 autocast: torch.autocast('cpu', dtype=torch.bfloat16) around forward and loss, backward outside, "
        "separate weights and AdamW state; a speedup of a bf16 row is against MONAI's fp32 step. Steps under "
        "autocast are timed only with native bf16 (avx512_bf16 / AMX) or --bf16 on; otherwise one autocast step "
        "of each class is tried at the config's miniature, to report whether it runs.",
    ]
    options = [res.config for res in results if res.config.ours_options]
    if options:
        lines.append(
            "- MAEViT-only options ("
            + "; ".join(f"{cfg.name}: " + ", ".join(f"{k}={v!r}" for k, v in cfg.ours_options) for cfg in options)
            + "): MONAI's class has none of them, so the two are not the same network (their weights differ "
            "slightly: LayerScale gammas, no class token, no unused cross-attention norms); the ratio compares "
            "the two implementations at the same widths, depths and token count, each with its own blocks."
        )
    if any(m.error for res in results for m in res.models.values()):
        lines.append("- a model out of memory has no timings; its ratios are n/a (nan).")
    return "\n".join(lines)


def environment(args: argparse.Namespace, n_steps: int, warmup: int) -> dict[str, str]:
    """What benchmarks/README.md quotes: versions, CPU, threads, command line."""
    return {
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv]),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "steps": str(n_steps),
        "warmup": str(warmup),
        "optimizer": "AdamW (fused, as build_optimizer picks)"
        if args.fused_adamw
        else "AdamW (torch's per-tensor loop)",
        "load_start": load_average_1min(),
        "load_end": "",
        "bf16": "",
        "bf16_matmul": "",
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configurations (< 1 minute)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 8, --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, --quick 1)")
    parser.add_argument(
        "--configs", nargs="+", choices=("a", "b", "c"), default=["a", "b"],
        help="configs to run (default a b; c: long sequence with MAEViT's block options)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all)"
    )
    parser.add_argument(
        "--fused-adamw", action=argparse.BooleanOptionalAction, default=True,
        help="AdamW(fused=True) for both models, as monai_mae.engines.build_optimizer picks (default); "
        "--no-fused-adamw: torch's per-tensor loop (on CPU 30-50%% of a ViT-B step, the same for both models)",
    )  # fmt: skip
    parser.add_argument(
        "--bf16", choices=("auto", "on", "off"), default="auto",
        help="time steps under CPU bf16 autocast too: auto (default) when the CPU has avx512_bf16 or AMX, on, off; "
        "without timing, one autocast step of each class is still tried at the config's miniature",
    )  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--decoders", action="store_true",
        help="time only MAEViT, once per decoder (self-attention; cross-attention predicting 1.0 / 0.25 of the "
        "masked patches), at the chosen configs; no MONAI model, FLOPs or memory",
    )  # fmt: skip
    parser.add_argument(
        "--json",
        metavar="OUT",
        nargs="?",
        const="",
        default=None,
        help="also write all measurements to this JSON file (--json alone: benchmarks/results/bench_vs_monai.json, "
        "or bench_vs_monai_decoders.json with --decoders)",
    )
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "MODEL"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.json == "":  # --json without a file: the benchmark's place under benchmarks/results/
        RESULTS.mkdir(parents=True, exist_ok=True)
        args.json = str(RESULTS / ("bench_vs_monai_decoders.json" if args.decoders else "bench_vs_monai.json"))
    for flag in ("steps", "warmup", "threads", "child_steps"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "warmup" else 1):
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {value}.")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # raised inside MONAI's sin-cos table
    if args.child is not None:  # memory subprocess: print one JSON line
        config_name, model_name = args.child
        print(json.dumps(measure_memory(CONFIGS[config_name], model_name, args.child_steps, args.fused_adamw)))
        return

    n_steps = args.steps if args.steps is not None else (3 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    torch.manual_seed(0)
    env = environment(args, n_steps, warmup)
    if args.decoders:
        main_decoders(args, env, n_steps, warmup)
        return
    matmul_rate, matmul_times = matmul_gflops()
    native_bf16, bf16_text = cpu_bf16_support()
    time_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16)
    env["bf16"] = (
        f"{'native' if native_bf16 else 'no native'} bf16 matrix instructions ({bf16_text}); steps under bf16 "
        f"autocast {'timed' if time_bf16 else 'not timed'} (--bf16 {args.bf16})"
    )
    if native_bf16 and args.bf16 != "off":
        bf16_rate, bf16_times = matmul_gflops(dtype=torch.bfloat16)
        env["bf16_matmul"] = "2048x2048, median of 10"
    elif args.bf16 != "off":  # without native bf16 a 2048^2 product takes minutes: a small one shows the rate
        bf16_rate, bf16_times = matmul_gflops(size=256, repeats=3, dtype=torch.bfloat16)
        env["bf16_matmul"] = "256x256, median of 3"
    else:
        bf16_rate, bf16_times = float("nan"), []
    results = []
    for key in args.configs:
        config = CONFIGS[f"{key}-quick" if args.quick else key]
        print(f"running config {config.name} ({config.title}) ...", file=sys.stderr, flush=True)
        results.append(
            run_config(
                config,
                n_steps,
                warmup,
                args.threads,
                matmul_rate,
                memory=not args.no_memory,
                fused_adamw=args.fused_adamw,
                bf16=time_bf16,
                bf16_matmul_rate=bf16_rate,
                smoke_config=CONFIGS[f"{key}-quick"],
            )  # fmt: skip
        )
    env["load_end"] = load_average_1min()
    print(format_report(results, env, matmul_rate, bf16_rate))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "environment": env,
                    "matmul_gflops": matmul_rate,
                    "matmul_times_s": matmul_times,
                    "bf16_matmul_gflops": bf16_rate,
                    "bf16_matmul_times_s": bf16_times,
                    "results": [asdict(res) for res in results],
                },
                out,
                indent=2,
            )


def main_decoders(args: argparse.Namespace, env: dict[str, str], n_steps: int, warmup: int) -> None:
    """``--decoders``: the MAEViT decoder variants at each chosen config, printed as markdown (and ``--json``)."""
    lines = [
        "## MAEViT: self-attention vs cross-attention decoder",
        "",
        f"- command: `{env['command']}`",
        f"- torch {env['torch']}, CPU: {env['cpu']}, torch threads: {env['threads']}; optimiser: {env['optimizer']}",
        f"- training steps: median [min, max] of {n_steps} timed steps after {warmup} warm-up, variants interleaved",
        f"- load average (1 min) at start: {env['load_start']}",
    ]
    results = {}
    for key in args.configs:
        config = CONFIGS[f"{key}-quick" if args.quick else key]
        print(f"running config {config.name} decoders ...", file=sys.stderr, flush=True)
        results[config.name] = run_decoder_variants(config, n_steps, warmup, args.fused_adamw)
        lines += format_decoder_table(config, results[config.name])
    lines.append(f"\nload average (1 min) at the end: {load_average_1min()}")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as out:
            summary = {name: {label: {"params": params, "step_times_s": timing.times, "step_median_s": timing.median}
                              for label, (params, timing) in variants.items()}
                       for name, variants in results.items()}  # fmt: skip
            json.dump({"environment": env, "decoders": summary}, out, indent=2)


if __name__ == "__main__":
    main()
