"""Can the CT data pipeline keep an H100 busy? Per-worker crop rates of four data paths at full size.

Data: CT-sized synthetic volumes (default 4 of 512 x 512 x 300 at 0.8 x 0.8 x 1.25 mm; phantoms of
:func:`monai_mae.data.synthetic.make_phantom` stored as scanners export them: int16 with
``scl_inter = -1024``, LPS voxel order, gzipped NIfTI), written once into ``--work-dir`` and reused.
Crops: 96^3 and 160^3 of the packaged CT data preset (resampled to 1.5 x 1.5 x 2 mm, window
-175..250 HU, foreground crop, 2 crops per volume), counted as crops, not volumes.

Per data path and crop size, the crops per second of ONE loader worker (``monai.data.DataLoader``
with ``num_workers=0`` and a batch of one volume, so collate included; torch at 1 thread, as in a
DataLoader worker process) and its peak memory:

(a) ``nifti``: the NIfTI files through :func:`~monai_mae.data.get_pretrain_transforms`
    (today's default, ``get_dataset(cache="none")``);
(b) ``persistent``: MONAI ``PersistentDataset`` (``get_dataset(cache="persistent")``), steady state;
    the first pass, which fills the on-disk cache, is reported separately;
(c) ``preprocessed``: :class:`~monai_mae.data.PreprocessedCropDataset` (memory-mapped
    crops of float16 ``.npy``) over a folder made by :func:`~monai_mae.data.preprocess.preprocess_dataset`
    (1 worker, 1 thread; its time per volume and disk size are reported). Flips and intensity jitter
    belong on the GPU there (``gpu_augment``) and are not in this path; (a) and (b) flip on the CPU;
(d) ``storage``: the same dataset with ``storage_layout=True`` (what the bundles' ``gpu_augment`` path
    reads): float16 crops as stored, spatial axes reversed, a plain copy of the file's rows, no
    conversion; :func:`~monai_mae.data.from_storage_layout` turns each batch into float32
    (B, C, X, Y, Z) on the GPU. Its cost is timed here on this CPU (1 thread, per crop, not counted in
    the worker's rate) and estimated for the GPU from the bytes it moves (``--gpu-bandwidth``).

``--paths`` measures a subset (e.g. ``--paths preprocessed storage``: (c) and (d) side by side);
ratios to (a) are then n/a.

How: every (path, crop size, round) runs in its own child process, forked from this one after the
imports as DataLoader workers are (``--isolation subprocess``: a fresh interpreter each, 10-30 s of
imports on a busy 2-core machine; ``none``: this process, for the tests). Rates are crops per
CPU-second of that process (a worker with a core of its own; other jobs on a shared machine stretch
the wall clock, which is reported too). Peak memory: peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` before the timed passes; not reported where the kernel refuses) minus the
RSS before them. The paths run in ``--rounds`` interleaved rounds (a, b, c, then c, b, a, ...): the
(a) volumes are split over the rounds, (b) fills its cache in the first round (one cache for all
crop sizes where no volume is smaller than the crops, so that the padding to the crop size it
caches changes nothing), (c) makes one untimed pass per round, then (b) and (c) time whole passes
for at least ``--min-seconds`` CPU-seconds. The files are hot in the page cache (just written), as
for a dataset that fits in RAM.

Training, on this CPU (forward, masked loss, backward, fused AdamW; one untimed warm-up step that
counts the FLOPs with ``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions,
attention) for (i) ViT-B/16 at 96^3 (``mae_vit("base")``, 216 tokens, 75% masked, batch
``--vit-batch``) and (ii) Primus-S with 8^3 patches at 160^3 (``mae_vit("primus_s")``: 396 x 12,
RoPE, SwiGLU, 2-block 384-wide decoder; 8000 tokens, batch 1). The FLOPs per step give the step
rate of an H100 at ``--mfu`` (40%) of its dense bf16 peak (``--gpu-tflops`` 989), hence the crops
per second it consumes, and the loader workers each path needs to keep up (GPU crops/s / crops/s
per worker) against ``--workers-available`` (14, a 16-core machine).

Targets (issue #13): (c) at least 20x (a) per worker at 96^3; few enough (c) (or (d)) workers for a
16-core machine to keep one H100 busy with ViT-B/16 at 96^3.

Prints a markdown table; writes it and every raw number to ``--out-dir`` (``bench_data.md`` and
``bench_data.json``; ``bench_data_quick.*`` with ``--quick``).

Run::

    .venv/bin/python benchmarks/bench_data.py           # full size: ~5 CPU-minutes, + ~2 to write the volumes once
    .venv/bin/python benchmarks/bench_data.py --quick   # small volumes, tiny networks, seconds
    # on a shared machine (8 min here at load average 3-5): 2 volumes, the 8^3 model's counted step timed
    .venv/bin/python benchmarks/bench_data.py --volumes 2 --vit-batch 2 --vit-steps 2 --big-steps 0 --min-seconds 1.5
    # (c) and (d) only, same sizes
    .venv/bin/python benchmarks/bench_data.py --paths preprocessed storage --volumes 2 --vit-batch 2 --vit-steps 2 \
        --big-steps 0 --min-seconds 1.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import monai
import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader

from monai_mae import MaskedReconstructionLoss, mae_vit
from monai_mae.data import (
    PreprocessedCropDataset,
    from_storage_layout,
    get_dataset,
    get_pretrain_transforms,
    load_data_preset,
    load_datalist,
    preprocess_dataset,
)
from monai_mae.data.preprocess import FOREGROUND_MARGIN
from monai_mae.data.synthetic import make_phantom
from monai_mae.engines import build_optimizer
from monai_mae.utils import atomic_write

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared helpers
from bench_common import (  # noqa: E402
    RESULTS,
    cpu_name,
    flop_counter,
    load_average,
    peak_rss_mib,
    proc_status_mib,
    reset_peak_rss,
)

__all__ = [
    "PATHS",
    "ModelSpec",
    "Settings",
    "FULL",
    "QUICK",
    "flops_per_step",
    "measure_loader",
    "measure_preprocessing",
    "measure_training",
    "write_ct_volumes",
    "summarise",
    "format_report",
    "main",
]

REPO = Path(__file__).resolve().parents[1]
#: The data paths, in table order: (key, label).
PATHS: tuple[tuple[str, str], ...] = (
    ("nifti", "(a) NIfTI + transforms, no cache"),
    ("persistent", "(b) PersistentDataset, steady state"),
    ("preprocessed", "(c) preprocessed .npy, mmap crops"),
    ("storage", "(d) preprocessed .npy, storage layout"),
)
_PREPROCESSED = ("preprocessed", "storage")  # the paths that read the preprocessed folder
_RESULT_MARK = "BENCH_DATA_RESULT "
_VOLUME_FORMAT = 1  # bump when write_ct_volumes changes what it writes


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One MAE training step to measure: a named :func:`~monai_mae.mae_vit` size at one crop size."""

    label: str
    preset: str
    img_size: int
    patch_size: int
    batch: int
    steps: int  # timed steps, after one untimed warm-up step that counts the FLOPs
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 3


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run; ``rois[i]`` is the crop size that ``models[i]`` trains on."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    volumes: int
    rois: tuple[int, ...]
    models: tuple[ModelSpec, ...]
    rounds: int
    min_seconds: float  # timed seconds per round of the fast paths (steady (b), (c))
    warmup_shape: tuple[int, int, int] = (64, 64, 40)


FULL = Settings(
    shape=(512, 512, 300),
    spacing=(0.8, 0.8, 1.25),
    volumes=4,
    rois=(96, 160),
    models=(
        ModelSpec("ViT-B/16", "base", 96, 16, batch=4, steps=3),
        ModelSpec("Primus-S/8", "primus_s", 160, 8, batch=1, steps=1),
    ),
    rounds=2,
    min_seconds=3.0,
)
_TINY_PRIMUS = (
    ("hidden_size", 48), ("mlp_dim", 128), ("num_layers", 1), ("num_heads", 2),
    ("decoder_hidden_size", 48), ("decoder_mlp_dim", 128), ("decoder_num_layers", 1), ("decoder_num_heads", 2),
)  # fmt: skip
QUICK = Settings(
    shape=(64, 64, 40),
    spacing=(0.8, 0.8, 1.25),
    volumes=2,
    rois=(16, 24),
    models=(
        ModelSpec(
            "tiny ViT/8", "tiny", 16, 8, batch=2, steps=1, overrides=(("num_layers", 1), ("decoder_num_layers", 1))
        ),
        ModelSpec("tiny Primus/8", "primus_s", 24, 8, batch=1, steps=1, overrides=_TINY_PRIMUS),
    ),
    rounds=2,
    min_seconds=0.05,
    warmup_shape=(24, 24, 16),
)


# ---------------------------------------------------------------------------------------- the data
def write_ct_volumes(
    folder: str | os.PathLike[str],
    num: int,
    shape: Sequence[int],
    spacing: Sequence[float],
    seed: int = 0,
    warmup_shape: Sequence[int] = (64, 64, 40),
) -> tuple[Path, float]:
    """Write ``num`` CT-like phantoms as scanner-style NIfTI and a Decathlon datalist of them, reusing what exists.

    Volume ``i`` (``imagesTr/ct_<i>.nii.gz``): :func:`~monai_mae.data.synthetic.make_phantom`
    (anatomical layout, 5 organs, noise sd 10 HU) with the ``i``-th seed of ``SeedSequence(seed)``,
    stored as int16 ``HU + 1024`` with ``scl_slope = 1, scl_inter = -1024`` (so a reader gets float
    HU after scaling, as with real CT), in LPS voxel order (affine ``diag(-sx, -sy, sz)``, which the
    RAS reorientation flips), gzipped. ``warmup.nii.gz`` is a small volume of the same kind for
    untimed warm-ups. ``volumes.json`` records the settings: in a folder with the same settings only
    missing volumes are written (another settings stamp clears the folder); ``datalist.json`` lists
    the first ``num``.

    Returns:
        ``(folder, seconds spent writing volumes)``, 0 when all were there.
    """
    out = Path(folder)
    spec = {"format": _VOLUME_FORMAT, "shape": [int(s) for s in shape], "spacing": [float(s) for s in spacing],
            "seed": int(seed), "warmup_shape": [int(s) for s in warmup_shape]}  # fmt: skip
    stamp = out / "volumes.json"
    if out.is_dir() and (not stamp.is_file() or json.loads(stamp.read_text()) != spec):
        shutil.rmtree(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    atomic_write(stamp, lambda f: f.write(json.dumps(spec) + "\n"), mode="w")
    seeds = np.random.SeedSequence(seed).generate_state(num)
    names = [f"imagesTr/ct_{i:03d}.nii.gz" for i in range(num)]
    jobs = [(n, int(s), tuple(shape)) for n, s in zip(names, seeds)]
    jobs.append(("warmup.nii.gz", int(seed) + 10_000, tuple(warmup_shape)))
    start = time.perf_counter()
    written = 0
    for name, case_seed, dims in jobs:
        if (out / name).is_file():
            continue
        image, _ = make_phantom(dims, seed=case_seed, num_organs=5, layout="anatomical")
        stored = np.round(image[::-1, ::-1] + 1024.0).astype(np.int16)  # LPS voxel order, 0..4095
        del image
        affine = np.diag([-float(spacing[0]), -float(spacing[1]), float(spacing[2]), 1.0])
        affine[:3, 3] = (np.asarray(dims, dtype=float) - 1) / 2 * np.array([1.0, 1.0, -1.0]) * np.asarray(spacing)
        img = nib.Nifti1Image(stored, affine)
        img.header.set_slope_inter(1.0, -1024.0)
        img.header.set_xyzt_units("mm")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        tmp = out / f".tmp-{os.getpid()}-{Path(name).name}"  # keeps the .nii.gz suffix nibabel needs
        try:
            nib.save(img, tmp)
            os.replace(tmp, out / name)
        finally:
            tmp.unlink(missing_ok=True)
        written += 1
    datalist = {"name": "bench_data CT-sized phantoms", "training": [{"image": n} for n in names]}
    atomic_write(out / "datalist.json", lambda f: f.write(json.dumps(datalist, indent=1) + "\n"), mode="w")
    return out, time.perf_counter() - start if written else 0.0


def _ct_preset(roi: int, num_samples: int | None) -> dict[str, Any]:
    """The packaged CT data preset at crop size ``roi^3`` (and ``num_samples`` crops per volume if given)."""
    extra = {"num_samples": num_samples} if num_samples else {}
    return load_data_preset("ct", roi_size=(roi, roi, roi), **extra)


# ------------------------------------------------------------------------------- loader measurement
def _timed_pass(loader: DataLoader) -> list[tuple[float, float, int]]:
    """One pass over ``loader``: ``(wall seconds, CPU seconds of this process, crops)`` per batch."""
    out, it = [], iter(loader)
    while True:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            batch = next(it)
        except StopIteration:
            return out
        out.append((time.perf_counter() - wall, time.process_time() - cpu, int(batch["image"].shape[0])))


def measure_loader(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one data path at one crop size in this process, as one DataLoader worker would run it.

    ``spec``: ``path`` (a :data:`PATHS` key), ``roi``, ``num_samples``, ``data_dir``, ``items``
    (datalist indices, path ``nifti``), ``cache_dir`` (``persistent``), ``pre_dir``
    (``preprocessed``, ``storage``), ``min_seconds``, ``threads``, ``seed``.

    Returns:
        ``{"batches": [[wall s, CPU s, crops], ...], "rss_base_mib", "peak_mib", "peak_growth_mib", "threads",
        "first_pass": [...]}`` (empty unless this run filled the persistent cache; then also
        ``"first_pass_memory"``), memory as :func:`_with_peak` reports it; path ``storage`` also
        ``"convert": [[wall s, CPU s, crops], ...]``, :func:`from_storage_layout` of its batches on this CPU.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(spec["threads"]))
    try:
        return _measure_loader(spec)
    finally:
        torch.set_num_threads(threads_before)


def _measure_loader(spec: dict[str, Any]) -> dict[str, Any]:
    path, roi, data_dir = spec["path"], int(spec["roi"]), Path(spec["data_dir"])
    preset = _ct_preset(roi, spec.get("num_samples"))
    transform = get_pretrain_transforms(**preset)
    items = load_datalist(data_dir, "training")
    generator = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    if path in _PREPROCESSED:
        dataset = PreprocessedCropDataset(
            spec["pre_dir"], "training", roi_size=roi, num_samples=preset["num_samples"], preset=preset,
            storage_layout=path == "storage",
        )  # fmt: skip
    else:
        transform({"image": str(data_dir / "warmup.nii.gz")})  # untimed warm-up of the chain (lazy imports, kernels)
        if path == "nifti":
            dataset = get_dataset([items[i] for i in spec["items"]], transform, cache="none")
        elif path == "persistent":
            dataset = get_dataset(items, transform, cache="persistent", cache_dir=spec["cache_dir"])
        else:
            raise ValueError(f"unknown data path {path!r}; expected one of {[k for k, _ in PATHS]}.")
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=0, generator=generator)
    out: dict[str, Any] = {"first_pass": [], "threads": torch.get_num_threads()}
    if path == "persistent" and not any(Path(spec["cache_dir"]).glob("*.pt")):
        out["first_pass"], out["first_pass_memory"] = _with_peak(lambda: _timed_pass(loader))  # fills the cache
    elif path in _PREPROCESSED:
        _timed_pass(loader)  # untimed warm-up pass (maps, page cache)

    def timed() -> list[tuple[float, float, int]]:
        if path == "nifti":
            return _timed_pass(loader)
        batches: list[tuple[float, float, int]] = []
        while not batches or sum(b[1] for b in batches) < float(spec["min_seconds"]):
            batches += _timed_pass(loader)
        return batches

    out["batches"], memory = _with_peak(timed)
    if path == "storage":
        out["convert"] = _timed_conversion(loader, float(spec["min_seconds"]) / 3)
    return {**out, **memory}


def _timed_conversion(loader: DataLoader, min_seconds: float) -> list[tuple[float, float, int]]:
    """:func:`from_storage_layout` of one pass's image batches on this CPU, repeated for ``min_seconds`` CPU-s:
    ``(wall s, CPU s, crops)`` per batch (the work the GPU does after the copy, here on one core)."""
    images = [batch["image"] for batch in loader]
    from_storage_layout(images[0])  # untimed warm-up
    out: list[tuple[float, float, int]] = []
    while not out or sum(b[1] for b in out) < min_seconds:
        for image in images:
            wall, cpu = time.perf_counter(), time.process_time()
            from_storage_layout(image)
            out.append((time.perf_counter() - wall, time.process_time() - cpu, int(image.shape[0])))
    return out


def _with_peak(fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """``fn()`` and this process's memory around it: ``rss_base_mib`` before, ``peak_mib`` (``VmHWM``) after,
    ``peak_growth_mib`` = peak - base when the peak could be reset before ``fn`` (else NaN)."""
    base = proc_status_mib("VmRSS")
    reset = reset_peak_rss()
    result = fn()
    peak = peak_rss_mib()
    return result, {"rss_base_mib": base, "peak_mib": peak, "peak_growth_mib": peak - base if reset else math.nan}


def measure_preprocessing(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`preprocess_dataset` with 1 worker into a fresh ``spec["pre_dir"]`` at ``spec["threads"]`` threads.

    Returns:
        ``{"seconds": wall, "cpu_seconds", "volume_seconds": [wall per volume, from the manifest],
        "bytes": [per volume], "shapes": [...], "rss_base_mib", "peak_mib", "peak_growth_mib"}``.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(spec["threads"]))
    try:
        out = Path(spec["pre_dir"])
        shutil.rmtree(out, ignore_errors=True)
        start, cpu = time.perf_counter(), time.process_time()
        manifest, memory = _with_peak(lambda: preprocess_dataset(spec["data_dir"], out, "ct", workers=1, labels=False))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        torch.set_num_threads(threads_before)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "volume_seconds": [v["seconds"] for v in manifest["volumes"]],
        "bytes": [sum(v["bytes"].values()) for v in manifest["volumes"]],
        "shapes": [v["shape"] for v in manifest["volumes"]],
        **memory,
    }


_TASKS = {"loader": measure_loader, "preprocess": measure_preprocessing}
#: How each measurement is isolated: ``fork`` (a forked child, as DataLoader workers are made), ``subprocess``
#: (a fresh interpreter; ~10-30 s of imports each on a busy 2-core machine) or ``none`` (this process).
ISOLATIONS = ("fork", "subprocess", "none")


def _fork_target(spec: dict[str, Any], conn: Any) -> None:
    try:
        conn.send(_TASKS[spec["task"]](spec))
    except BaseException:  # reported by the parent
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def _run_child(spec: dict[str, Any], isolation: str) -> dict[str, Any]:
    """Run ``spec`` (``task``: ``loader`` or ``preprocess``) in a forked child, a fresh interpreter, or here."""
    what = f"{spec['task']} {spec.get('path', '')} {spec.get('roi', '')}".strip()
    if isolation == "none":
        return _TASKS[spec["task"]](spec)
    if isolation == "fork":
        ctx = multiprocessing.get_context("fork")
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_fork_target, args=(spec, sender), daemon=True)
        proc.start()
        sender.close()
        try:
            result = receiver.recv()
        except EOFError:
            result = {"error": "the child exited without a result (killed, out of memory?)"}
        proc.join()
        if "error" in result:
            raise RuntimeError(f"bench_data child {what} failed (exit {proc.exitcode}):\n{result['error']}")
        return result
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench_data child {what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(_RESULT_MARK) :])


# ----------------------------------------------------------------------------------- training steps
def flops_per_step(step: Any) -> int:
    """Matmul/conv/attention FLOPs of ``step()`` (elementwise work and the optimiser are not counted)."""
    with flop_counter() as counter:
        step()
    return int(counter.get_total_flops())


def measure_training(spec: ModelSpec, seed: int = 0) -> dict[str, Any]:
    """Training steps of ``spec`` on this CPU: one warm-up step under ``FlopCounterMode``, then ``spec.steps`` timed.

    The step: ``zero_grad``, forward (75% masked), :class:`MaskedReconstructionLoss`, backward, fused
    AdamW. Each step's wall-clock and CPU seconds of this process are recorded. With ``spec.steps == 0``
    the warm-up step is the timed one (``"timed_warmup": True``; it includes one-off costs).

    Returns:
        ``{"flops": per step, "warmup_s", "warmup_cpu_s", "step_s": [...], "step_cpu_s": [...],
        "timed_warmup", "params", "threads"}``.
    """
    torch.manual_seed(seed)
    net = mae_vit(spec.preset, img_size=spec.img_size, patch_size=spec.patch_size, **dict(spec.overrides))
    loss_fn = MaskedReconstructionLoss(spec.patch_size)
    optimizer = build_optimizer(net, lr=1e-4)
    images = torch.rand(spec.batch, 1, spec.img_size, spec.img_size, spec.img_size)

    def forward_backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(images), images).backward()

    wall, cpu = time.perf_counter(), time.process_time()
    flops = flops_per_step(forward_backward)
    optimizer.step()
    warmup = (time.perf_counter() - wall, time.process_time() - cpu)
    times = []
    for _ in range(spec.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        forward_backward()
        optimizer.step()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    timed = times or [warmup]
    return {
        "flops": flops, "warmup_s": warmup[0], "warmup_cpu_s": warmup[1], "step_s": [t[0] for t in timed],
        "step_cpu_s": [t[1] for t in timed], "timed_warmup": not times,
        "params": sum(p.numel() for p in net.parameters() if p.requires_grad), "threads": torch.get_num_threads(),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ summary
def _rate(batches: Sequence[Sequence[float]], clock: str = "cpu") -> float:
    """Crops per second of ``(wall s, CPU s, crops)`` batches, on the worker's CPU time or the wall clock."""
    seconds = sum(b[1] if clock == "cpu" else b[0] for b in batches)
    return sum(b[2] for b in batches) / seconds if seconds > 0 else math.nan


def summarise(
    raw: dict[str, Any],
    settings: Settings,
    gpu_tflops: float,
    mfu: float,
    workers_available: int,
    gpu_bandwidth: float = 3.35e12,
) -> dict[str, Any]:
    """Rates, ratios, GPU demand and workers needed from the raw measurements of :func:`main`.

    ``raw["loader"][path][str(roi)]`` is the list of per-round :func:`measure_loader` results for
    the measured paths, ``raw["training"][i]`` the :func:`measure_training` result of
    ``settings.models[i]``; ``gpu_bandwidth`` (bytes/s) prices (d)'s conversion on the GPU.
    """
    effective = gpu_tflops * 1e12 * mfu
    models = []
    for spec, result in zip(settings.models, raw["training"]):
        step, cpu_step = statistics.median(result["step_s"]), statistics.median(result["step_cpu_s"])
        gpu_steps = effective / result["flops"]
        models.append({
            "label": spec.label, "preset": spec.preset, "roi": spec.img_size, "patch": spec.patch_size,
            "tokens": spec.tokens, "batch": spec.batch, "params": result["params"],
            "gflop_per_step": result["flops"] / 1e9,
            "wall_step_s": step, "cpu_step_s": cpu_step, "threads": result["threads"],
            "timed_warmup": result["timed_warmup"], "timed_steps": len(result["step_s"]),
            "cpu_crops_per_s": spec.batch / cpu_step, "cpu_gflops": result["flops"] / 1e9 / cpu_step,
            "gpu_steps_per_s": gpu_steps, "gpu_crops_per_s": gpu_steps * spec.batch,
        })  # fmt: skip
    rows = []
    paths = [(path, label) for path, label in PATHS if path in raw["loader"]]
    for roi, model in zip(settings.rois, models):
        for path, label in paths:
            rounds = raw["loader"][path][str(roi)]
            rate = _rate([b for r in rounds for b in r["batches"]])
            row = {
                "path": path, "label": label, "roi": roi, "crops_per_s": rate,
                "wall_crops_per_s": _rate([b for r in rounds for b in r["batches"]], "wall"),
                "round_rates": [_rate(r["batches"]) for r in rounds],
                "crops": sum(b[2] for r in rounds for b in r["batches"]),
                "seconds": sum(b[1] for r in rounds for b in r["batches"]),
                "wall_seconds": sum(b[0] for r in rounds for b in r["batches"]),
                "peak_growth_mib": max(r["peak_growth_mib"] for r in rounds),
                "peak_mib": max(r["peak_mib"] for r in rounds),
                "model": model["label"], "gpu_crops_per_s": model["gpu_crops_per_s"],
                "workers_needed": model["gpu_crops_per_s"] / rate,
            }  # fmt: skip
            first = [b for r in rounds for b in r["first_pass"]]
            if first:
                row["first_pass"] = {
                    "crops_per_s": _rate(first),
                    "wall_crops_per_s": _rate(first, "wall"),
                    "seconds_per_volume": sum(b[1] for b in first) / len(first),
                    "wall_seconds_per_volume": sum(b[0] for b in first) / len(first),
                    "peak_growth_mib": max(
                        r["first_pass_memory"]["peak_growth_mib"] for r in rounds if r["first_pass"]
                    ),
                }
            convert = [b for r in rounds for b in r.get("convert", [])]
            if convert:
                moved = roi**3 * (2 + 4)  # bytes per crop: float16 read, float32 written
                row["convert"] = {
                    "cpu_ms_per_crop": 1e3 * sum(b[1] for b in convert) / sum(b[2] for b in convert),
                    "mb_per_crop": moved / 1e6, "gpu_us_per_crop": 1e6 * moved / gpu_bandwidth,
                }  # fmt: skip
            rows.append(row)
        base = next((r["crops_per_s"] for r in rows if r["roi"] == roi and r["path"] == "nifti"), math.nan)
        for row in rows:
            if row["roi"] == roi:
                row["x_vs_a"] = row["crops_per_s"] / base
    pre = raw["preprocess"]
    volumes = raw["volumes"]
    preprocessing = {
        "seconds_per_volume": statistics.mean(pre["volume_seconds"]),
        "wall_seconds_per_volume": pre["seconds"] / len(pre["volume_seconds"]),
        "cpu_seconds_per_volume": pre["cpu_seconds"] / len(pre["volume_seconds"]),
        "mb_per_volume": statistics.mean(pre["bytes"]) / 1e6,
        "shapes": pre["shapes"],
        "peak_growth_mib": pre["peak_growth_mib"],
        "nifti_mb_per_volume": statistics.mean(volumes["nifti_bytes"]) / 1e6,
        "raw_int16_mb_per_volume": 2 * math.prod(settings.shape) / 1e6,
    }
    if raw.get("persistent_cache_bytes"):
        caches = 1 if raw.get("persistent_shared_cache") else len(settings.rois)
        per_volume = raw["persistent_cache_bytes"] / settings.volumes / caches
        preprocessing["persistent_cache_mb_per_volume"] = per_volume / 1e6
    first_roi = settings.rois[0]
    by = {(r["path"], r["roi"]): r for r in rows}
    targets = []
    c_first = by.get(("preprocessed", first_roi))
    if c_first is not None and ("nifti", first_roi) in by:
        targets.append({
            "name": f"(c) >= 20x (a) per worker at {first_roi}^3",
            "value": c_first["x_vs_a"], "met": c_first["x_vs_a"] >= 20.0,
            "text": f"{c_first['x_vs_a']:.0f}x",
        })  # fmt: skip
    for path, tag in (("preprocessed", "(c)"), ("storage", "(d)")):
        if (path, first_roi) in by:
            needed = by[(path, first_roi)]["workers_needed"]
            targets.append({
                "name": f"{workers_available} workers keep one H100 busy with {models[0]['label']} at {first_roi}^3 "
                        f"on {tag}",
                "value": needed, "met": needed <= workers_available, "text": f"{needed:.1f} workers needed",
            })  # fmt: skip
    return {
        "rows": rows, "models": models, "preprocessing": preprocessing, "targets": targets,
        "gpu": {"peak_tflops": gpu_tflops, "mfu": mfu, "effective_tflops": effective / 1e12,
                "bandwidth_tb_s": gpu_bandwidth / 1e12},
        "workers_available": workers_available, "persistent_shared_cache": bool(raw.get("persistent_shared_cache")),
    }  # fmt: skip


def _fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}" if abs(value) >= 1 else f"{value:.{digits + 1}g}"


def _ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}x"


def format_report(summary: dict[str, Any], env: dict[str, Any], settings: Settings) -> str:
    """The markdown report: header, table, one line per model, preprocessing, verdicts."""
    gpu, workers = summary["gpu"], summary["workers_available"]
    lines = [
        f"# bench_data: {env['command']}",
        f"# {env['cpu']}, {env['cores']} cores; torch {env['torch']}, MONAI {env['monai']}; loader workers at "
        f"{env['loader_threads']} thread ({env['isolation']} isolation), training at {env['threads']} threads",
        f"# load average (1/5/15 min): start {env['load_start']}, end {env['load_end']}; {env['minutes']:.1f} min",
        f"# data: {settings.volumes} volumes {'x'.join(map(str, settings.shape))} int16 NIfTI (.nii.gz) at "
        f"{' x '.join(map(str, settings.spacing))} mm, CT preset (resampled to 1.5 x 1.5 x 2 mm, "
        f"{env['num_samples']} crops per volume); {settings.rounds} interleaved rounds",
        "",
        "| path | crop | crops/s per worker [per round] | (wall clock) | peak MiB | x vs (a) | workers for one H100 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        rounds = ", ".join(_fmt(r) for r in row["round_rates"])
        lines.append(
            f"| {row['label']} | {row['roi']}^3 | {_fmt(row['crops_per_s'])} [{rounds}] | {_fmt(row['wall_crops_per_s'])} "
            f"| {_fmt(row['peak_growth_mib'], 0)} | {_ratio(row['x_vs_a'])} | {row['workers_needed']:.1f} ({row['model']}) |"
        )
    lines += [
        "",
        "crops/s per worker: crops per CPU-second of one DataLoader worker (num_workers=0, 1 torch thread, collate "
        "included; the process's CPU time, so a worker with a core of its own; other jobs on this machine stretch "
        "the wall clock, in brackets after it) over all rounds; peak MiB: peak RSS of the worker's own process "
        "minus its RSS before the timed passes (max over rounds). Workers for one H100: the GPU's crops/s (below) / "
        "crops/s per worker.",
        "",
    ]
    for m in summary["models"]:
        steps = "the FLOP-counted first step" if m["timed_warmup"] else f"median of {m['timed_steps']} after a warm-up"
        lines.append(
            f"- {m['label']} at {m['roi']}^3 ({m['tokens']} tokens, 75% masked, batch {m['batch']}, "
            f"{m['params'] / 1e6:.1f}M weights): {_fmt(m['gflop_per_step'])} GFLOP/step; this CPU at {m['threads']} "
            f"thread(s): {m['cpu_step_s']:.2f} CPU-s/step ({steps}; wall clock {m['wall_step_s']:.2f} s) = "
            f"{m['cpu_crops_per_s']:.3g} crops/CPU-s ({_fmt(m['cpu_gflops'])} GFLOP per CPU-s); H100 at {gpu['mfu']:.0%} "
            f"of {gpu['peak_tflops']:.0f} TFLOP/s = {gpu['effective_tflops']:.0f} TFLOP/s -> "
            f"{m['gpu_steps_per_s']:.0f} steps/s = **{m['gpu_crops_per_s']:.0f} crops/s**"
        )
    p = summary["preprocessing"]
    shapes = sorted({"x".join(map(str, s[1:])) for s in p["shapes"]})
    lines += [
        f"- (c) one-off preprocessing (1 worker, 1 thread): {_fmt(p['cpu_seconds_per_volume'])} CPU-s per volume with "
        f"the input checks (wall clock {_fmt(p['wall_seconds_per_volume'])} s; {_fmt(p['seconds_per_volume'])} s without "
        f"the checks), peak {_fmt(p['peak_growth_mib'], 0)} MiB; "
        f"{p['mb_per_volume']:.1f} MB per volume on disk (stored {', '.join(shapes)}) against "
        f"{p['nifti_mb_per_volume']:.1f} MB .nii.gz and {p['raw_int16_mb_per_volume']:.1f} MB raw int16",
    ]
    for row in summary["rows"]:
        if "first_pass" in row:
            fp = row["first_pass"]
            shared = ""
            if summary["persistent_shared_cache"]:
                shared = ", shared by all crop sizes: no volume is smaller than the crops"
            lines.append(
                f"- (b) first pass at {row['roi']}^3 (fills the cache{shared}): {_fmt(fp['crops_per_s'])} crops/s per worker, "
                f"{_fmt(fp['seconds_per_volume'])} CPU-s per volume (wall clock {_fmt(fp['wall_seconds_per_volume'])} s), "
                f"peak {_fmt(fp['peak_growth_mib'], 0)} MiB"
            )
    if "persistent_cache_mb_per_volume" in p:
        lines.append(f"- (b) cache on disk: {p['persistent_cache_mb_per_volume']:.1f} MB per volume (float32 .pt)")
    rates = {(r["path"], r["roi"]): r["crops_per_s"] for r in summary["rows"]}
    for row in summary["rows"]:
        if ("preprocessed", row["roi"]) in rates and row["path"] == "storage":
            lines.append(
                f"- (d) / (c) per worker at {row['roi']}^3: {row['crops_per_s'] / rates[('preprocessed', row['roi'])]:.2f}x "
                "(the same crops; float16 rows copied as stored instead of converted to float32 and transposed)"
            )
        if "convert" in row:
            cv = row["convert"]
            lines.append(
                f"- (d) from_storage_layout at {row['roi']}^3 (float16 (B, C, Z, Y, X) -> float32 (B, C, X, Y, Z), after "
                f"the copy, not in the worker's rate): {_fmt(cv['cpu_ms_per_crop'])} CPU-ms per crop on this CPU at 1 "
                f"thread; on the GPU it moves {cv['mb_per_crop']:.1f} MB per crop: ~{_fmt(cv['gpu_us_per_crop'])} us at "
                f"{gpu['bandwidth_tb_s']:.2f} TB/s"
            )
    lines.append("")
    for target in summary["targets"]:
        lines.append(f"- target: {target['name']}: {target['text']}: **{'met' if target['met'] else 'not met'}**")
    for roi, m in zip(settings.rois, summary["models"]):
        by = {r["path"]: r for r in summary["rows"] if r["roi"] == roi}
        supply = {k: workers * by[k]["crops_per_s"] for k, _ in PATHS if k in by}
        verdicts = [
            f"{'enough' if supply[k] >= m['gpu_crops_per_s'] else 'not enough'} with {tag}"
            for k, tag in (("preprocessed", "(c)"), ("storage", "(d)")) if k in supply
        ]  # fmt: skip
        lines.append(
            f"- {workers} workers at {roi}^3 supply {', '.join(f'{k} {_fmt(v)}' for k, v in supply.items())} crops/s "
            f"against {m['gpu_crops_per_s']:.0f} for {m['label']} on one H100 (16-core machine: {', '.join(verdicts)})"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small volumes, tiny networks (seconds)")
    parser.add_argument(
        "--paths", nargs="+", choices=[k for k, _ in PATHS], default=None,
        help="data paths to measure (default all: nifti persistent preprocessed storage)",
    )  # fmt: skip
    parser.add_argument("--volumes", type=int, default=None, help="number of volumes (default 4; 2 with --quick)")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="volume shape (default 512 512 300)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per path (default 2)")
    parser.add_argument("--num-samples", type=int, default=None, help="crops per volume (default: the CT preset's, 2)")
    parser.add_argument(
        "--min-seconds", type=float, default=None, help="timed CPU-seconds per round of (b) and (c) (default 3)"
    )
    parser.add_argument("--vit-batch", type=int, default=None, help="crops per ViT-B/16 step (default 4)")
    parser.add_argument(
        "--vit-steps", type=int, default=None, help="timed ViT-B/16 steps after the warm-up (default 3)"
    )
    parser.add_argument(
        "--big-steps",
        type=int,
        default=None,
        help="timed steps of the 8^3-patch model (default 1; 0: time the warm-up)",
    )
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="H100 SXM dense bf16 peak (TFLOP/s)")
    parser.add_argument("--mfu", type=float, default=0.40, help="fraction of the peak the GPU reaches")
    parser.add_argument(
        "--gpu-bandwidth", type=float, default=3.35, help="H100 SXM memory bandwidth (TB/s), prices (d)'s conversion"
    )
    parser.add_argument(
        "--workers-available", type=int, default=14, help="loader workers of the GPU machine (16 cores)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the training steps (default 1: CPU-seconds = one core's time)",
    )
    parser.add_argument(
        "--loader-threads", type=int, default=1, help="torch threads of a loader worker (DataLoader workers get 1)"
    )
    parser.add_argument("--work-dir", type=Path, default=RESULTS / "bench_data_work")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--isolation",
        choices=ISOLATIONS,
        default="fork" if "fork" in multiprocessing.get_all_start_methods() else "subprocess",
        help="each measurement in a forked child (default; as DataLoader workers), a fresh interpreter, or this process",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    counts = ("volumes", "rounds", "num_samples", "vit_batch", "vit_steps", "workers_available", "threads")
    for name in (*counts, "loader_threads", "big_steps"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "big_steps" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu must be in (0, 1], got {args.mfu}.")
    return args


def _settings(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else FULL
    models = list(settings.models)
    if args.vit_batch:
        models[0] = dataclasses.replace(models[0], batch=args.vit_batch)
    if args.vit_steps:
        models[0] = dataclasses.replace(models[0], steps=args.vit_steps)
    if args.big_steps is not None:
        models[1] = dataclasses.replace(models[1], steps=args.big_steps)
    changes: dict[str, Any] = {"models": tuple(models)}
    for name in ("volumes", "rounds", "min_seconds"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.shape:
        changes["shape"] = tuple(args.shape)
    return dataclasses.replace(settings, **changes)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the summary (also written to ``--out-dir``)."""
    args = parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        result = _TASKS[spec["task"]](spec)
        print(_RESULT_MARK + json.dumps(result), flush=True)
        return result
    started = time.perf_counter()
    settings = _settings(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_data_quick" if args.quick else "bench_data"
    partial = args.out_dir / f"{stem}.partial.json"  # the raw numbers so far, in case the run is stopped

    def save_partial() -> None:
        partial.write_text(json.dumps({"argv": list(argv or sys.argv[1:]), "raw": raw}, indent=1, default=float) + "\n")

    load_start = load_average()
    tag = "x".join(map(str, settings.shape)) + f"_{'x'.join(map(str, settings.spacing))}mm"
    work = args.work_dir
    data_dir, generate_s = write_ct_volumes(
        work / f"volumes_{tag}", settings.volumes, settings.shape, settings.spacing, warmup_shape=settings.warmup_shape
    )
    tag += f"_n{settings.volumes}"
    print(f"# volumes in {data_dir} ({'written in %.0f s' % generate_s if generate_s else 'reused'})", flush=True)
    nifti_bytes = [(data_dir / f"imagesTr/ct_{i:03d}.nii.gz").stat().st_size for i in range(settings.volumes)]
    raw: dict[str, Any] = {
        "volumes": {"dir": str(data_dir), "generate_s": generate_s, "nifti_bytes": nifti_bytes},
        "load": {"start": load_start},
    }
    pre_dir, run_dir = work / f"preprocessed_{tag}", work / f"run_{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    common = {"data_dir": str(data_dir), "threads": args.loader_threads, "num_samples": args.num_samples}
    raw["preprocess"] = _run_child({"task": "preprocess", "pre_dir": str(pre_dir), **common}, args.isolation)
    raw["load"]["after_preprocess"] = load_average()
    print(f"# preprocessed {settings.volumes} volumes in {raw['preprocess']['seconds']:.0f} s", flush=True)
    save_partial()

    # PersistentDataset caches the chain up to its first random step, SpatialPadd to the crop size included, under
    # a key that does not depend on the crop size; where no volume is smaller than the largest crop (the padding
    # does nothing), the crop sizes share one cache and only the first fills it
    smallest = min(min(shape[1:]) for shape in raw["preprocess"]["shapes"]) - 2 * FOREGROUND_MARGIN
    shared_cache = smallest >= max(settings.rois)
    raw["persistent_shared_cache"] = shared_cache
    order = [path for path, _ in PATHS if args.paths is None or path in args.paths]
    raw["loader"] = {path: {str(roi): [] for roi in settings.rois} for path in order}
    for rnd in range(settings.rounds):
        for roi in settings.rois:
            for path in order if rnd % 2 == 0 else order[::-1]:
                spec = {
                    "task": "loader", "path": path, "roi": roi, "seed": rnd,
                    "items": list(range(settings.volumes))[rnd :: settings.rounds] if settings.rounds <= settings.volumes
                    else [rnd % settings.volumes],
                    "cache_dir": str(run_dir / ("persistent" if shared_cache else f"persistent_{roi}")),
                    "pre_dir": str(pre_dir),
                    "min_seconds": settings.min_seconds, **common,
                }  # fmt: skip
                result = _run_child(spec, args.isolation)
                result["load"] = load_average()
                raw["loader"][path][str(roi)].append(result)
                rates = f"{_rate(result['batches']):.3g} crops/CPU-s, {_rate(result['batches'], 'wall'):.3g} crops/s"
                print(f"# round {rnd + 1} {path} {roi}^3: {rates}, load {result['load'][0]}", flush=True)
                save_partial()
    raw["persistent_cache_bytes"] = sum(p.stat().st_size for p in run_dir.rglob("*.pt")) if run_dir.is_dir() else 0
    shutil.rmtree(run_dir, ignore_errors=True)
    raw["load"]["before_training"] = load_average()
    raw["training"] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for spec in settings.models:
            result = measure_training(spec)
            result["load"] = load_average()
            raw["training"].append(result)
            step, cpu = statistics.median(result["step_s"]), statistics.median(result["step_cpu_s"])
            print(f"# {spec.label} {spec.img_size}^3: {cpu:.2f} CPU-s/step, {step:.2f} s, load {result['load'][0]}")
            save_partial()
    finally:
        torch.set_num_threads(threads)
    summary = summarise(raw, settings, args.gpu_tflops, args.mfu, args.workers_available, args.gpu_bandwidth * 1e12)
    env = {
        "command": " ".join(["python benchmarks/bench_data.py", *(argv if argv is not None else sys.argv[1:])]),
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "monai": monai.__version__,
        "python": platform.python_version(), "threads": args.threads, "loader_threads": args.loader_threads,
        "num_samples": args.num_samples or load_data_preset("ct")["num_samples"],
        "load_start": load_start, "load_end": load_average(), "minutes": (time.perf_counter() - started) / 60,
        "isolation": args.isolation,
    }  # fmt: skip
    report = format_report(summary, env, settings)
    print(report)
    (args.out_dir / f"{stem}.md").write_text(report)
    payload = {"env": env, "settings": dataclasses.asdict(settings), "summary": summary, "raw": raw}
    (args.out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    partial.unlink(missing_ok=True)
    return summary


if __name__ == "__main__":
    main()
