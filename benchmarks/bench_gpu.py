"""GPU throughput of MAE pretraining steps: ``monai_mae.MAEViT`` vs MONAI's ``MaskedAutoEncoderViT``.

For each encoder (ViT-B, ViT-L), volume size (96^3, 128^3; 16^3 patches, 1 channel, masking ratio
0.75) and model, one training step is: ``zero_grad``, forward and ``MaskedReconstructionLoss`` under
``torch.autocast(dtype=torch.bfloat16)``, backward, fused ``AdamW.step()`` (fp32 master weights;
bf16 needs no gradient scaler). Both models get the same settings; the decoder is 384 wide
(MLP 1536, 8 layers, 12 heads) because MONAI's 3D sin-cos table needs a width divisible by 6.

Printed as a markdown table, per (encoder, size, model):

* step time: median of ``--steps`` timed steps after ``--warmup`` untimed ones (``torch.cuda.synchronize``
  around each step), and images/s = batch / median step time;
* peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (weights, AdamW state,
  gradients and activations; the counter is reset after the warm-up);
* MFU (model FLOP utilisation): FLOPs of one eager forward + loss + backward counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention kernels; the
  optimiser's elementwise work is not counted), divided by the median step time and by the GPU's
  peak dense bf16 FLOP/s: looked up by the device's exact name in ``bench_common.PEAK_BF16_TFLOPS``
  (H100 SXM 989, PCIe 756, NVL 835 TFLOP/s; ``--gpu NAME`` uses another entry), or given with
  ``--peak-tflops``; a device not in the table is reported without an MFU.

MONAI's ``MaskedAutoEncoderViT`` (1.6.1) cannot run under autocast: its decoder writes the
autocast (bf16) decoder tokens into a buffer built from the fp32 mask token with ``index_put``,
which raises "Index put requires the source and destination dtypes match". Its row then says so
and is timed without autocast (fp32, TF32 matmuls on CUDA) as a baseline; its MFU is still quoted
against the bf16 peak.

``--compile`` wraps both models in ``torch.compile`` (compilation happens in the warm-up steps; the
FLOPs are always counted on the eager model). Without a CUDA device the script exits with a message;
``--cpu-smoke`` runs the same code path on the CPU with tiny sizes (bf16 autocast on CPU, fused CPU
AdamW) so that it can be tested anywhere.

Examples::

    python benchmarks/bench_gpu.py                              # ViT-B and ViT-L, 96^3 and 128^3, batch 8
    python benchmarks/bench_gpu.py --encoders vit-b --sizes 96 --batch-size 16 --compile
    python benchmarks/bench_gpu.py --gpu a100 --json      # -> benchmarks/results/bench_gpu.json
    python benchmarks/bench_gpu.py --cpu-smoke                  # < 1 minute on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import monai
import torch
import torch.nn as nn
from monai.networks.nets import MaskedAutoEncoderViT

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.engines import build_optimizer, cuda_bf16_supported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared helpers
from bench_common import (  # noqa: E402
    GIB,
    PEAK_BF16_TFLOPS,
    RESULTS,
    flop_counter,
    fmt_optional,
    peak_bf16_flops,
    sync,
    time_calls,
)

__all__ = [
    "ENCODERS",
    "DECODER",
    "Result",
    "build_model",
    "train_step",
    "count_flops",
    "bench_one",
    "main",
]


ENCODERS = {
    "vit-b": dict(hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12),
    "vit-l": dict(hidden_size=1024, mlp_dim=4096, num_layers=24, num_heads=16),
}
DECODER = dict(decoder_hidden_size=384, decoder_mlp_dim=1536, decoder_num_layers=8, decoder_num_heads=12)
PATCH = 16
SIZES = (96, 128)

# --cpu-smoke: the same code path at toy sizes
_SMOKE_ENCODERS = {"tiny": dict(hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4)}
_SMOKE_DECODER = dict(decoder_hidden_size=48, decoder_mlp_dim=96, decoder_num_layers=1, decoder_num_heads=4)
_SMOKE_SIZES = (32,)

MODELS: dict[str, type[nn.Module]] = {"monai_mae": MAEViT, "monai": MaskedAutoEncoderViT}


@dataclass
class Result:
    """One row of the table (``None`` where a figure does not apply, e.g. GPU memory on the CPU)."""

    model: str
    encoder: str
    img_size: int
    batch_size: int
    compiled: bool
    precision: str = "bf16 autocast"
    step_ms: float | None = None
    step_ms_min: float | None = None
    images_per_s: float | None = None
    peak_mem_gib: float | None = None
    tflop_per_step: float | None = None
    achieved_tflops: float | None = None
    mfu: float | None = None
    error: str | None = None


def build_model(model: str, encoder: dict, decoder: dict, img_size: int, device: torch.device) -> nn.Module:
    """``MAEViT`` or MONAI's ``MaskedAutoEncoderViT`` with the same constructor arguments, in train mode."""
    net = MODELS[model](in_channels=1, img_size=img_size, patch_size=PATCH, masking_ratio=0.75, **encoder, **decoder)
    return net.to(device).train()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: MaskedReconstructionLoss,
    images: torch.Tensor,
    autocast: bool = True,
) -> Callable[[], torch.Tensor]:
    """A closure running one training step on ``images (B, 1, S, S, S)`` and returning the loss.

    Forward and loss run under bf16 autocast unless ``autocast=False``.
    """

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(images), images)  # pred (B, N, P^3) bf16, loss fp32
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def count_flops(
    model: nn.Module, loss_fn: MaskedReconstructionLoss, images: torch.Tensor, autocast: bool = True
) -> int:
    """FLOPs of one eager forward + loss + backward (bf16 autocast unless ``autocast=False``); clears the gradients."""
    model.zero_grad(set_to_none=True)
    with flop_counter() as counter:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(images), images)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_one(
    model_name: str,
    encoder_name: str,
    encoder: dict,
    decoder: dict,
    img_size: int,
    batch_size: int,
    device: torch.device,
    steps: int,
    warmup: int,
    compile_model: bool,
    peak_flops: float | None,
) -> Result:
    """Build one model, count its FLOPs, time ``steps`` training steps and read the peak memory."""
    result = Result(model_name, encoder_name, img_size, batch_size, compile_model)
    torch.manual_seed(0)
    try:
        model = build_model(model_name, encoder, decoder, img_size, device)
        optimizer = build_optimizer(model, lr=1.5e-4, fused=True)
        loss_fn = MaskedReconstructionLoss(PATCH)
        images = torch.rand(batch_size, 1, img_size, img_size, img_size, device=device)
        autocast = True
        try:
            flops = count_flops(model, loss_fn, images)
        except RuntimeError as err:
            if model_name != "monai" or "dtype" not in str(err):
                raise
            autocast, result.precision = False, f"fp32 (bf16 autocast fails: {str(err).splitlines()[0]})"
            flops = count_flops(model, loss_fn, images, autocast=False)
        step = train_step(torch.compile(model) if compile_model else model, optimizer, loss_fn, images, autocast)
        for _ in range(warmup):
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        times = time_calls(lambda: losses.append(step()), steps, device)
        loss = losses[-1]
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        median = statistics.median(times)
        result.step_ms, result.step_ms_min = median * 1e3, min(times) * 1e3
        result.images_per_s = batch_size / median
        result.tflop_per_step = flops / 1e12
        result.achieved_tflops = flops / median / 1e12
        result.mfu = flops / median / peak_flops if peak_flops else None
        if device.type == "cuda":
            result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / GIB
    except torch.cuda.OutOfMemoryError as err:
        result.error = f"out of memory ({str(err).splitlines()[0]})"
    finally:
        model = optimizer = images = step = None  # noqa: F841 - release before the next configuration
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def table(results: Sequence[Result]) -> str:
    """The results as a markdown table."""
    lines = [
        "| encoder | size | model | precision | batch | step ms (median, min) | images/s | peak mem GiB "
        "| TFLOP/step | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r.encoder} | {r.img_size}^3 | {r.model} | {r.precision} | {r.batch_size} "
        if r.error:
            lines.append(f"{head}| {r.error} | | | | | |")
            continue
        lines.append(
            f"{head}| {fmt_optional(r.step_ms, '.1f')} ({fmt_optional(r.step_ms_min, '.1f')}) "
            f"| {fmt_optional(r.images_per_s, '.1f')} | {fmt_optional(r.peak_mem_gib, '.2f')} | {fmt_optional(r.tflop_per_step, '.4g')} "
            f"| {fmt_optional(r.achieved_tflops, '.4g')} | {'n/a' if r.mfu is None else f'{100 * r.mfu:.3g}%'} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoders", nargs="+", choices=sorted(ENCODERS), default=sorted(ENCODERS))
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=list(SIZES), help="cubic volume sides (multiples of 16)"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (default 3; compilation happens here)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--gpu",
        choices=sorted(PEAK_BF16_TFLOPS),
        metavar="DEVICE_NAME",
        help="take the MFU's peak bf16 FLOP/s of this device (default: the device's own name; one of "
        + ", ".join(repr(n) for n in sorted(PEAK_BF16_TFLOPS))
        + ")",
    )
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for the MFU, overriding --gpu")
    parser.add_argument("--cpu-smoke", action="store_true", help="run the same code path on the CPU with tiny sizes")
    parser.add_argument(
        "--json",
        metavar="OUT",
        nargs="?",
        const=str(RESULTS / "bench_gpu.json"),
        help="also write the rows as JSON (--json alone: benchmarks/results/bench_gpu.json)",
    )
    return parser


def _peak_flops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops is not None:
        if args.peak_tflops <= 0:
            raise SystemExit(f"bench_gpu.py: --peak-tflops must be > 0, got {args.peak_tflops}.")
        return args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    name = args.gpu or (torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    peak = peak_bf16_flops(name) if name else None
    if peak is None:
        return None, f"unknown for {name or device.type!r}: no MFU (pass --peak-tflops)"
    return peak, f"{peak / 1e12:g} TFLOP/s ({name})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch-size and --steps must be >= 1 and --warmup >= 0.")
    if args.cpu_smoke:
        device = torch.device("cpu")
        encoders, decoder, sizes = _SMOKE_ENCODERS, _SMOKE_DECODER, _SMOKE_SIZES
        batch_size, steps, warmup = min(args.batch_size, 2), min(args.steps, 2), min(args.warmup, 1)
    else:
        if not torch.cuda.is_available():
            parser.exit(
                2,
                f"bench_gpu.py: no CUDA device is available (torch {torch.__version__}, built with CUDA "
                f"{torch.version.cuda or 'none'}); run it on a GPU machine, or pass --cpu-smoke to run the same code "
                "path on the CPU with tiny sizes.\n",
            )
        if not cuda_bf16_supported(torch.device("cuda", torch.cuda.current_device())):
            parser.exit(
                2,
                f"bench_gpu.py: {torch.cuda.get_device_name()} has no native bf16 (it emulates it); "
                "this benchmark measures bf16 autocast.\n",
            )
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        encoders, decoder, sizes = {k: ENCODERS[k] for k in args.encoders}, DECODER, tuple(args.sizes)
        batch_size, steps, warmup = args.batch_size, args.steps, args.warmup
        bad = [s for s in sizes if s < PATCH or s % PATCH]
        if bad:
            parser.error(f"--sizes must be multiples of {PATCH}, got {bad}.")
    peak, peak_text = _peak_flops(args, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--cpu-smoke)"
    print(f"# bench_gpu: {shlex.join(['bench_gpu.py', *(argv if argv is not None else sys.argv[1:])])}")
    settings = "bf16 autocast, fused AdamW" + (", torch.compile" if args.compile else "")
    print(
        f"device {device_name}; torch {torch.__version__}, monai {monai.__version__}; {settings}; peak {peak_text}; "
        f"{steps} timed steps after {warmup} warm-up\n"
    )
    results = []
    for encoder_name, encoder in encoders.items():
        for size in sizes:
            for model_name in args.models:
                result = bench_one(
                    model_name,
                    encoder_name,
                    encoder,
                    decoder,
                    size,
                    batch_size,
                    device,
                    steps,
                    warmup,
                    args.compile,
                    peak,
                )
                results.append(result)
                print(f"  done: {encoder_name} {size}^3 {model_name}", file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "peak_flops": peak, "rows": [asdict(r) for r in results]}, f, indent=1)
    return 1 if any(r.error for r in results) and args.cpu_smoke else 0


if __name__ == "__main__":
    sys.exit(main())
