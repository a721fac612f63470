"""One script for a GPU machine (under 5 minutes): do the bundles run there, and how fast are the models?

1. ``mae_pretrain`` and ``mae_finetune`` (``train.json``) for one short epoch on ``cuda:0`` with bf16 autocast
   (``--amp true``) and ``--compile true``, on synthetic phantoms;
2. both bundles with ``multi_gpu_train.json`` under ``torchrun`` on every visible GPU (DDP, NCCL);
3. a table of volumes/s, MFU, peak memory and host syncs per training step for ``MAEViT`` against MONAI's
   ``MaskedAutoEncoderViT`` at ViT-B (96^3 crops, 16^3 patches) and Primus-B widths (160^3, 8^3 patches: 8000
   tokens), bf16 autocast and fused AdamW. Host syncs are counted with ``torch.cuda.set_sync_debug_mode("warn")``
   over one step after the warm-up; the MFU uses ``bench_common.PEAK_BF16_TFLOPS`` (no MFU for other devices).

Exit code 0 when every check passed, 1 when one failed (the table says which, the log path is printed), 2 for bad
arguments or no CUDA device. ``--dry-run --device cpu`` runs the table at toy sizes on the CPU and lists the bundle
commands without running them (the path the tests use).

Run: ``make gpu-check`` or ``python benchmarks/gpu_check.py [--json [OUT]]`` (``--json`` alone writes
``benchmarks/results/gpu_check.json``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from monai.networks.nets import MaskedAutoEncoderViT

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.engines import build_optimizer
from monai_mae.networks.presets import encoder_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import GIB, RESULTS, fmt_optional, median_seconds, peak_bf16_flops, sync  # noqa: E402
from bench_gpu import count_flops, train_step  # noqa: E402

__all__ = ["CONFIGS", "Check", "Row", "bundle_commands", "checks_table", "main", "measure", "rows_table"]

REPO = Path(__file__).resolve().parents[1]
_VIT_B = dict(hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12)
_PRIMUS_B = {k: v for k, v in encoder_preset("primus_b").items() if k in ("hidden_size", "mlp_dim", "num_layers",
                                                                           "num_heads")}  # fmt: skip
_DECODER = dict(decoder_hidden_size=384, decoder_mlp_dim=1536, decoder_num_layers=8, decoder_num_heads=12)
#: (name, encoder, crop side, patch side, batch) of the model table; MONAI's class gets the same widths and plain
#: blocks (Primus-B's RoPE / SwiGLU / LayerScale are options of MAEViT only)
CONFIGS = {
    "full": [("ViT-B", _VIT_B, 96, 16, 4), ("Primus-B", _PRIMUS_B, 160, 8, 2)],
    "dry-run": [("tiny", dict(hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4), 32, 16, 2),
                ("tiny-8", dict(hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4), 16, 8, 2)],
}  # fmt: skip
_DRY_DECODER = dict(decoder_hidden_size=48, decoder_mlp_dim=96, decoder_num_layers=1, decoder_num_heads=4)
MODELS = {"monai_mae": MAEViT, "monai": MaskedAutoEncoderViT}


@dataclass
class Row:
    """One model-table row; ``None`` where a figure does not apply (GPU memory or syncs on a CPU)."""

    config: str
    model: str
    img_size: int
    patch: int
    batch_size: int
    volumes_per_s: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    syncs_per_step: int | None = None
    error: str | None = None


@dataclass
class Check:
    """One bundle check: its name, the command, whether it passed and how long it took."""

    name: str
    command: list[str]
    passed: bool | None = None  # None: not run (--dry-run)
    seconds: float | None = None
    log: str | None = None


def _count_syncs(step, device: torch.device) -> int | None:
    """Host syncs of one call of ``step`` (CUDA's sync debug mode warns once per synchronising call)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def measure(config: tuple, model_name: str, decoder: dict, device: torch.device, steps: int, compile_model: bool,
            peak_flops: float | None) -> Row:  # fmt: skip
    """Time ``steps`` bf16 training steps of one model at one configuration (after 2 warm-up steps)."""
    name, encoder, img_size, patch, batch = config
    row = Row(name, model_name, img_size, patch, batch)
    torch.manual_seed(0)
    try:
        model = MODELS[model_name](in_channels=1, img_size=img_size, patch_size=patch, masking_ratio=0.75, **encoder,
                                   **decoder).to(device).train()  # fmt: skip
        optimizer = build_optimizer(model, lr=1.5e-4)
        loss_fn = MaskedReconstructionLoss(patch)
        images = torch.rand(batch, 1, img_size, img_size, img_size, device=device)
        try:
            flops, autocast = count_flops(model, loss_fn, images), True
        except RuntimeError:  # MONAI's class under bf16 autocast (index_put dtype): fp32 instead
            flops, autocast = count_flops(model, loss_fn, images, autocast=False), False
        step = train_step(torch.compile(model) if compile_model else model, optimizer, loss_fn, images, autocast)
        for _ in range(2):
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        median = median_seconds(step, steps, device)
        row.volumes_per_s = batch / median
        row.mfu = flops / median / peak_flops if peak_flops else None
        if device.type == "cuda":
            row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / GIB
        row.syncs_per_step = _count_syncs(step, device)
    except torch.cuda.OutOfMemoryError as err:
        row.error = f"out of memory ({str(err).splitlines()[0][:60]})"
    finally:
        model = optimizer = images = step = None  # noqa: F841 - free the GPU before the next row
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def rows_table(rows: Sequence[Row]) -> str:
    """The model table as Markdown."""
    lines = ["| config | crop / patch | model | batch | volumes/s | MFU | peak mem GiB | host syncs/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        if r.error:
            lines.append(f"| {r.config} | {r.img_size}^3 / {r.patch}^3 | {r.model} | {r.batch_size} | {r.error} "
                         "| | | |")  # fmt: skip
            continue
        mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.3g}%"
        syncs = "n/a" if r.syncs_per_step is None else str(r.syncs_per_step)
        figures = f"{fmt_optional(r.volumes_per_s, '.2f')} | {mfu} | {fmt_optional(r.peak_mem_gib, '.2f')} | {syncs}"
        lines.append(f"| {r.config} | {r.img_size}^3 / {r.patch}^3 | {r.model} | {r.batch_size} | {figures} |")
    return "\n".join(lines)


def checks_table(checks: Sequence[Check]) -> str:
    """The bundle checks as Markdown: passed / FAILED / not run, with seconds."""
    lines = ["| check | result | seconds |", "| --- | --- | --- |"]
    for c in checks:
        result = "not run (--dry-run)" if c.passed is None else ("passed" if c.passed else f"FAILED (log: {c.log})")
        lines.append(f"| {c.name} | {result} | {fmt_optional(c.seconds, '.1f')} |")
    return "\n".join(lines)


_TINY = {
    "mae_pretrain": {"roi_size": [32, 32, 32], "patch_size": [16, 16, 16], "network_def#hidden_size": 192,
                     "network_def#mlp_dim": 768, "network_def#num_layers": 2, "network_def#num_heads": 3},
    "mae_finetune": {"roi_size": [32, 32, 32], "encoder#hidden_size": 192, "encoder#mlp_dim": 768,
                     "encoder#num_layers": 2, "encoder#num_heads": 3},
}  # fmt: skip


def bundle_commands(work: Path, gpus: int) -> list[Check]:
    """The bundle checks: each bundle on cuda:0 with bf16 and compile, then under torchrun on ``gpus`` GPUs."""
    checks = []
    for bundle, tiny in _TINY.items():
        configs = REPO / "bundles" / bundle / "configs"
        overrides = work / f"{bundle}.json"
        overrides.write_text(json.dumps({**tiny, "max_epochs": 1, "val_interval": 1, "num_samples": 1,
                                         "progress_bar": False, "resume": False, "amp": True}))  # fmt: skip
        common = ["--bundle_root", str(configs.parent), "--meta_file", str(configs / "metadata.json"),
                  "--logging_file", str(configs / "logging.conf"), "--dataset_dir", str(work / "data")]  # fmt: skip
        single = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                  str([str(configs / "train.json"), str(overrides)]), *common, "--output_dir", str(work / bundle),
                  "--device", "cuda:0", "--compile", "True"]  # fmt: skip
        checks.append(Check(f"{bundle}: cuda:0, bf16, compile", single))
        ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               "-m", "monai.bundle", "run", "--config_file",
               str([str(configs / "train.json"), str(configs / "multi_gpu_train.json"), str(overrides)]), *common,
               "--output_dir", str(work / f"{bundle}_ddp")]  # fmt: skip
        checks.append(Check(f"{bundle}: DDP on {gpus} GPU(s), bf16", ddp))
    return checks


def _run_check(check: Check, log_dir: Path) -> Check:
    log = log_dir / (check.name.split(":")[0] + ("_ddp" if "DDP" in check.name else "") + ".log")
    start = time.perf_counter()
    with open(log, "w") as f:
        result = subprocess.run(check.command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=600)
    check.seconds, check.passed, check.log = time.perf_counter() - start, result.returncode == 0, str(log)
    return check


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or, with --dry-run, cpu")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes; list the bundle commands, run none")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (default 5)")
    parser.add_argument("--no-compile", action="store_true", help="time the models without torch.compile")
    parser.add_argument("--skip-bundles", action="store_true", help="the model table only")
    parser.add_argument(
        "--json",
        metavar="OUT",
        nargs="?",
        const=str(RESULTS / "gpu_check.json"),
        help="also write the checks and rows as JSON (--json alone: benchmarks/results/gpu_check.json)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}.")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be 'cuda' or 'cpu', got {args.device!r}.")
    if device.type == "cpu" and not args.dry_run:
        parser.error("--device cpu only with --dry-run (toy sizes): this check measures a GPU.")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, f"gpu_check.py: no CUDA device is available (torch {torch.__version__}, built with CUDA "
                       f"{torch.version.cuda or 'none'}); run it on a GPU machine, or pass --dry-run --device cpu "
                       "for the toy-size path.\n")  # fmt: skip
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be 'cuda' or 'cpu', got {args.device!r}.")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_bf16_flops(name) if device.type == "cuda" else None
    print(f"gpu_check: {name}; torch {torch.__version__}; MFU peak "
          f"{'unknown: no MFU' if peak is None else f'{peak / 1e12:g} TFLOP/s'}")  # fmt: skip

    checks: list[Check] = []
    if not args.skip_bundles:  # the folder stays for the logs, except after a dry run
        work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        gpus = torch.cuda.device_count() if device.type == "cuda" else 1
        checks = bundle_commands(work, gpus)
        if args.dry_run:
            for check in checks:
                print("would run: " + shlex.join(check.command))
            shutil.rmtree(work)
        else:
            from monai_mae.data import write_synthetic_dataset

            write_synthetic_dataset(work / "data", num=2 * gpus + 1, num_validation=max(1, gpus), shape=(48, 48, 40))
            for check in checks:
                print(f"running {check.name} ...", flush=True)
                _run_check(check, work)
        print(checks_table(checks))

    mode = "dry-run" if args.dry_run else "full"
    decoder = _DRY_DECODER if args.dry_run else _DECODER
    compile_model = not args.no_compile and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = [measure(config, model, decoder, device, args.steps, compile_model, peak)
            for config in CONFIGS[mode] for model in MODELS]  # fmt: skip
    print(rows_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peak_flops": peak, "checks": [asdict(c) for c in checks],
                       "rows": [asdict(r) for r in rows]}, f, indent=1)  # fmt: skip
    failed = [c.name for c in checks if c.passed is False]
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
