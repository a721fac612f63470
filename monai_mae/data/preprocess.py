"""Preprocess once: the deterministic transforms of a data preset applied to every volume, stored for random crops.

At scale, loading, reorienting and resampling each CT or MRI volume every time a crop is drawn
costs more than the training step. ``python -m monai_mae.data.preprocess DATASET_DIR OUT_DIR
--modality ct`` applies the deterministic part of a data preset (the chain of
:func:`~monai_mae.data.get_pretrain_transforms` up to, not including, its padding and random crops:
load, channel first, RAS orientation, resampling to the preset's ``pixdim``, CT window to [0, 1] or
MRI normalisation, foreground crop with a small margin) once per volume and writes:

* ``OUT_DIR/images/<name>.npy``: the image, float16, shape (C, X, Y, Z);
* ``OUT_DIR/labels/<name>.npy``: the label (when the datalist has one), uint8, shape (1, X, Y, Z);
* ``OUT_DIR/manifest.json``: format and package version, the resolved preset, and per volume its
  split, source files, output files and sizes, shape, spacing, original affine and shape, and
  intensity statistics; volumes rejected by the input checks are listed under ``"skipped"``.

Why ``.npy`` in float16: ``np.load(path, mmap_mode="r")`` maps the file without reading it, and
slicing a crop out of the map reads only the disk pages that hold the crop's rows, so a random
96^3 crop of a 512 x 512 x 300 CT costs a few MB of I/O, not the whole volume. The arrays are
stored in Fortran (column-major) order, so the logical shape stays (C, X, Y, Z) and an axial slice
(the last axis) is one contiguous block. Chunked, compressed formats (Zarr, HDF5) would cut the
disk space further but need an extra dependency; ``.npy`` needs only numpy. CT is stored after the
window, in [0, 1], where float16 keeps a relative precision of 2^-11 (an absolute error below
2.5e-4, about 0.1 HU of a 425 HU window), at half the bytes of float32; labels are class indices,
uint8. MRI z-scores are stored in float16 too (``--image-dtype float32`` keeps full precision).

:class:`PreprocessedCropDataset` trains from such a folder: item ``i`` maps volume ``i`` and cuts
``num_samples`` random crops, laid out like MONAI's ``RandSpatialCropSamplesd`` output, so the
bundles' collate and :class:`~monai_mae.engines.MAEPrepareBatch` work unchanged;
:func:`gpu_augment` then flips and jitters a batch on the GPU. :func:`check_manifest` stops a run
whose data preset differs from the one the folder was made with.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import inspect
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, CropForegroundd, Randomizable, SpatialPadd
from monai.utils import ensure_tuple_rep, look_up_option

from monai_mae.data.datalist import check_volume, load_datalist
from monai_mae.data.transforms import MODALITIES, check_augment_options, get_pretrain_transforms, load_data_preset
from monai_mae.utils import atomic_write, read_json
from monai_mae.version import __version__

__all__ = [
    "FOREGROUND_MARGIN",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PreprocessedCropDataset",
    "check_manifest",
    "from_storage_layout",
    "get_deterministic_transforms",
    "gpu_augment",
    "main",
    "preprocess_dataset",
    "preprocess_settings",
    "read_manifest",
]

logger = logging.getLogger(__name__)

#: Version of the folder layout and manifest written by :func:`preprocess_dataset`.
FORMAT_VERSION = 1
#: File name of the manifest inside the output folder.
MANIFEST_NAME = "manifest.json"
#: Voxels kept around the foreground box (after resampling) by default.
FOREGROUND_MARGIN = 4

_FORMAT = "monai_mae.preprocessed"
_SPLITS = ("training", "validation")
_IMAGE_DTYPES = ("float16", "float32")
_LABEL_DTYPE = "uint8"
_ORIENTATION = "RAS"
_LOCK_NAME = ".preprocess.lock"
_NPY_HEADER = 128  # bytes of a .npy header of a 4D array (estimate only)
_COMPARED = ("modality", "pixdim", "orientation", "intensity")  # what a training run must agree on
_MAX_LISTED = 10  # names listed in one message


# --------------------------------------------------------------------------------------------------
# settings and the deterministic chain
# --------------------------------------------------------------------------------------------------


def _preset_defaults() -> dict[str, Any]:
    """Keyword defaults of :func:`get_pretrain_transforms` (what a preset that omits a key gets)."""
    return {
        name: p.default
        for name, p in inspect.signature(get_pretrain_transforms).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _as_pixdim(value: Any) -> list[float] | None:
    """``pixdim`` as three positive floats, or None for the native spacing."""
    if value is None:
        return None
    values = [float(v) for v in ensure_tuple_rep(value, 3)] if not isinstance(value, str) else []
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"pixdim must be one or three positive numbers (mm) or None, got {value!r}.")
    return values


def preprocess_settings(preset: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a data preset that the stored volumes depend on, fully resolved.

    Keys the preset leaves out get the defaults of :func:`~monai_mae.data.get_pretrain_transforms`,
    so the result is what the on-the-fly training chain would use. Keys that only matter for random
    crops (``roi_size``, ``num_samples``, ``flip_prob``, ...) are ignored.

    Args:
        preset: a data preset dict (e.g. from :func:`~monai_mae.data.load_data_preset`, or a bundle's
            model data preset), or a packaged preset name / JSON path read with ``load_data_preset``.

    Returns:
        ``{"modality", "pixdim" (3 floats or None), "orientation": "RAS", "intensity",
        "replace_nonfinite"}`` where ``intensity`` is ``{"kind": "window", "a_min", "a_max", "b_min": 0.0,
        "b_max": 1.0, "clip": True}`` for CT and ``{"kind": "normalise", "nonzero": True,
        "channel_wise": True}`` for MRI (``NormalizeIntensityd`` after the foreground crop).

    Raises:
        ValueError: for an unknown modality, a bad ``pixdim``, ``a_min >= a_max`` for CT, image
            ``keys`` other than ``("image",)``, or an orientation other than RAS.

    Examples::

        >>> preprocess_settings("ct")["intensity"]
        {'kind': 'window', 'a_min': -175.0, 'a_max': 250.0, 'b_min': 0.0, 'b_max': 1.0, 'clip': True}
        >>> preprocess_settings({"modality": "mri", "pixdim": 1.0})["pixdim"]
        [1.0, 1.0, 1.0]
    """
    if not isinstance(preset, Mapping):
        preset = load_data_preset(preset)
    full = {**_preset_defaults(), **preset}
    modality = full["modality"]
    try:
        modality = look_up_option(modality.lower() if isinstance(modality, str) else modality, MODALITIES)
    except ValueError as err:
        raise ValueError(f"modality={full['modality']!r} is not supported: {err}") from err
    keys = full.get("keys", ("image",))
    if ((keys,) if isinstance(keys, str) else tuple(keys)) != ("image",):
        raise ValueError(f"preprocessing reads one image key, 'image'; the preset has keys={keys!r}.")
    orientation = str(full.get("orientation", _ORIENTATION))
    if orientation != _ORIENTATION:
        raise ValueError(f"the deterministic chain orients volumes to {_ORIENTATION}; the preset has {orientation!r}.")
    if modality == "ct":
        a_min, a_max = float(full["a_min"]), float(full["a_max"])
        if not a_min < a_max:
            raise ValueError(f"a_min ({a_min}) must be below a_max ({a_max}) for the CT window.")
        intensity: dict[str, Any] = {"kind": "window", "a_min": a_min, "a_max": a_max}
        intensity.update({"b_min": 0.0, "b_max": 1.0, "clip": True})
    else:
        intensity = {"kind": "normalise", "nonzero": True, "channel_wise": True}
    return {
        "modality": modality,
        "pixdim": _as_pixdim(full["pixdim"]),
        "orientation": _ORIENTATION,
        "intensity": intensity,
        "replace_nonfinite": bool(full.get("replace_nonfinite", True)),
    }


def _chain(settings: Mapping[str, Any], with_label: bool, margin: int) -> Compose:
    """The deterministic prefix of the training chain for resolved ``settings``; see get_deterministic_transforms."""
    window = settings["intensity"]
    training = get_pretrain_transforms(
        modality=settings["modality"],
        roi_size=1,
        spatial_dims=3,
        pixdim=settings["pixdim"],
        a_min=window.get("a_min", -175.0),
        a_max=window.get("a_max", 250.0),
        num_samples=1,
        train=False,
        with_label=with_label,
        flip_prob=0.0,
        replace_nonfinite=settings["replace_nonfinite"],
    )
    keys = ("image", "label") if with_label else ("image",)
    steps: list[Callable] = []
    for step in training.transforms:
        if isinstance(step, SpatialPadd):  # the end of the deterministic part (padding to the crop size)
            break
        if isinstance(step, CropForegroundd):
            step = CropForegroundd(keys=keys, source_key="image", margin=margin, allow_smaller=True)
        steps.append(step)
    else:
        raise RuntimeError(
            "get_pretrain_transforms no longer pads with SpatialPadd after its deterministic steps; "
            "update monai_mae.data.preprocess to find the end of the deterministic part."
        )
    if not any(isinstance(step, CropForegroundd) for step in steps):
        raise RuntimeError("get_pretrain_transforms has no CropForegroundd before its padding; update preprocess.")
    return Compose(steps)


def get_deterministic_transforms(
    preset: str | os.PathLike[str] | Mapping[str, Any], with_label: bool = False, margin: int = FOREGROUND_MARGIN
) -> Compose:
    """The deterministic part of the training chain of a data preset, as applied by the preprocessing.

    The steps are those of :func:`~monai_mae.data.get_pretrain_transforms` before its padding to the
    crop size (``LoadImaged`` channel first, ``ReplaceNonFinited``, ``Orientationd("RAS")``,
    ``Spacingd`` with nearest interpolation for the label, then ``ScaleIntensityRanged`` +
    ``CropForegroundd`` for CT or ``CropForegroundd`` + ``NormalizeIntensityd`` for MRI), taken from
    that function so that both stay the same; only the foreground crop keeps ``margin`` voxels
    around the foreground box (the training chain uses none).

    Args:
        preset: a data preset dict, name or JSON path (see :func:`preprocess_settings`).
        with_label: also load and transform ``"label"``. Defaults to False.
        margin: voxels kept around the foreground box on each side, clipped at the volume's edge.
            Defaults to :data:`FOREGROUND_MARGIN`.

    Returns:
        A ``monai.transforms.Compose`` of MONAI dictionary transforms; its output ``"image"`` is a
        ``MetaTensor`` (C, X, Y, Z), float32.

    Raises:
        ValueError: for a bad preset (see :func:`preprocess_settings`) or a negative ``margin``.

    Examples::

        >>> [type(t).__name__ for t in get_deterministic_transforms("ct", with_label=True).transforms]
        ['LoadImaged', 'ReplaceNonFinited', 'Orientationd', 'Spacingd', 'ScaleIntensityRanged', 'CropForegroundd']
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"margin must be an int >= 0 (voxels), got {margin!r}.")
    return _chain(preprocess_settings(preset), bool(with_label), int(margin))


# --------------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------------


def _manifest_path(out_dir: str | os.PathLike[str]) -> Path:
    path = Path(out_dir)
    return path if path.name == MANIFEST_NAME and path.is_file() else path / MANIFEST_NAME


def _load_manifest(path: Path) -> dict[str, Any]:
    """Read a manifest and check its format and version (completeness is the caller's business)."""
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: not a monai_mae preprocessing manifest (format {found!r}, expected {_FORMAT!r}).")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: manifest format version {version!r} (written by monai_mae {manifest.get('package_version')}), "
            f"but monai_mae {__version__} reads format version {FORMAT_VERSION}; preprocess the dataset again into a "
            "new folder."
        )
    return manifest


def _missing_files(out_dir: Path, entry: Mapping[str, Any]) -> list[str]:
    """Output files of a manifest entry that are absent or not of the recorded size."""
    problems = []
    for key, rel in entry["files"].items():
        path = out_dir / rel
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"][key]:
            what = "missing" if size is None else f"{size} bytes, expected {entry['bytes'][key]}"
            problems.append(f"{path} ({what})")
    return problems


def read_manifest(
    out_dir: str | os.PathLike[str], *, require_complete: bool = True, check_files: bool = True
) -> dict[str, Any]:
    """Read the manifest of a preprocessed folder, checking that it can be trained from.

    Args:
        out_dir: the folder written by :func:`preprocess_dataset` (or its ``manifest.json``).
        require_complete: keyword-only. Refuse a manifest of a run that has not finished. Defaults to True.
        check_files: keyword-only. Every recorded output file must exist with its recorded size
            (a ``stat`` per file, nothing is read). Defaults to True.

    Returns:
        The manifest as a dict (see the module docstring and :func:`preprocess_dataset`).

    Raises:
        FileNotFoundError: when there is no manifest (the message says how to make one).
        ValueError: for malformed JSON (file, line, column), a file that is not a preprocessing
            manifest, another format version (both named), an incomplete run (with
            ``require_complete``), or missing / wrongly sized output files (named).

    Examples::

        manifest = read_manifest("/data/preprocessed/ct")
        [v["name"] for v in manifest["volumes"] if v["split"] == "validation"]
    """
    path = _manifest_path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {path.parent} holds no preprocessed dataset (or its preprocessing never started). "
            f"Make one with: python -m monai_mae.data.preprocess DATASET_DIR {path.parent} --modality ct|mri"
        )
    manifest = _load_manifest(path)
    if require_complete and not manifest.get("complete", False):
        planned = sum(len(names) for names in manifest.get("splits", {}).values())
        raise ValueError(
            f"{path}: incomplete preprocessing, {len(manifest.get('volumes', []))} of {planned} volumes done (the run "
            "stopped early); run the same preprocess command again to finish it (finished volumes are kept)."
        )
    if check_files:
        bad = [p for entry in manifest.get("volumes", []) for p in _missing_files(path.parent, entry)]
        if bad:
            shown = "\n  ".join(bad[:_MAX_LISTED]) + (
                f"\n  ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
            )
            raise ValueError(
                f"{path}: {len(bad)} recorded output file(s) are missing or damaged; run the same preprocess command "
                f"again to redo those volumes:\n  {shown}"
            )
    return manifest


def check_manifest(
    manifest_or_dir: Mapping[str, Any] | str | os.PathLike[str], preset: str | os.PathLike[str] | Mapping[str, Any]
) -> dict[str, Any]:
    """Check that a preprocessed folder was made with the data settings of this run.

    Compared: modality, spacing (``pixdim``, to 1e-6 relative), orientation and the intensity
    settings (CT window or MRI normalisation), each resolved as :func:`preprocess_settings` does.

    Args:
        manifest_or_dir: a manifest dict or a folder read with :func:`read_manifest`.
        preset: the run's data preset (dict, name or JSON path); keys unrelated to the stored
            volumes (``roi_size``, ``num_samples``, ...) are ignored.

    Returns:
        The manifest.

    Raises:
        ValueError: naming each differing setting with the manifest's value and the preset's value;
            and the errors of :func:`read_manifest` and :func:`preprocess_settings`.

    Examples::

        manifest = check_manifest("/data/preprocessed/ct", load_data_preset("ct"))
    """
    if isinstance(manifest_or_dir, Mapping):
        manifest, where = dict(manifest_or_dir), "the manifest"
    else:
        manifest, where = read_manifest(manifest_or_dir), str(_manifest_path(manifest_or_dir))
    stored = manifest["preset"]["settings"]
    wanted = preprocess_settings(preset)
    differences = []
    for key in _COMPARED:
        a, b = stored.get(key), wanted[key]
        if key == "pixdim" and a is not None and b is not None:
            same = np.allclose(a, b, rtol=1e-6, atol=0.0)
        else:
            same = a == b
        if not same:
            differences.append(f"{key}: {where} has {a!r}, the run's preset has {b!r}")
    if differences:
        raise ValueError(
            f"the preprocessed data does not match the run's data preset ({'; '.join(differences)}). Preprocess the "
            "dataset again with this preset, or train with the preset the folder was made with."
        )
    return manifest


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = _now()
    text = json.dumps(manifest, indent=1) + "\n"
    atomic_write(out_dir / MANIFEST_NAME, lambda f: f.write(text), mode="w")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# jobs: input checks and the per-volume work (run in worker processes)
# --------------------------------------------------------------------------------------------------


def _files_of(value: Any) -> list[str]:
    return [os.fspath(value)] if isinstance(value, (str, os.PathLike)) else [os.fspath(v) for v in value]


def _check_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Input checks of one volume (:func:`~monai_mae.data.check_volume` per file, image/label agreement)
    and an upper bound of its output bytes. Returns ``{"reasons": [...], "bytes": int}``."""
    reasons: list[str] = []
    images = _files_of(job["source"]["image"])
    label = job["source"].get("label")
    in_channels = job["in_channels"]
    if in_channels % len(images):
        reason = f"{images[0]}: {len(images)} image files cannot hold {in_channels} channel(s)."
        return {"reasons": [reason], "bytes": 0}
    for file in images:
        try:
            check_volume(
                file,
                in_channels=in_channels // len(images),
                allow_nonfinite=job["settings"]["replace_nonfinite"],
            )
        except (ValueError, FileNotFoundError) as err:
            reasons.append(str(err))
    if label is not None:
        try:
            check_volume(label, expect_label=True)
        except (ValueError, FileNotFoundError) as err:
            reasons.append(str(err))
    if reasons:
        return {"reasons": reasons, "bytes": 0}
    headers = {file: nib.load(file) for file in [*images, *([label] if label is not None else [])]}
    first = headers[images[0]]
    for file, img in headers.items():
        if file == images[0]:
            continue
        what = "label" if file == label else "image"
        if tuple(img.shape[:3]) != tuple(first.shape[:3]):
            reasons.append(
                f"{file}: {what} shape {tuple(img.shape[:3])} differs from image {images[0]} shape "
                f"{tuple(first.shape[:3])}."
            )
        elif not np.allclose(img.affine, first.affine, rtol=1e-4, atol=1e-3):
            reasons.append(
                f"{file}: {what} affine {np.round(img.affine, 4).tolist()} differs from that of image {images[0]} "
                f"{np.round(first.affine, 4).tolist()} (not on the same voxel grid)."
            )
    return {"reasons": reasons, "bytes": 0 if reasons else _estimate_bytes(job, first)}


def _estimate_bytes(job: Mapping[str, Any], img: Any) -> int:
    """Upper bound of the bytes a volume takes after resampling (before the foreground crop)."""
    shape = [int(s) for s in img.shape[:3]]
    pixdim = job["settings"]["pixdim"]
    if pixdim is not None:
        zooms = np.sqrt((np.asarray(img.affine, dtype=float)[:3, :3] ** 2).sum(axis=0))
        axes = nib.orientations.io_orientation(img.affine)[:, 0]
        out = [1, 1, 1]
        for i, j in enumerate(axes):
            j = i if not np.isfinite(j) else int(j)
            out[j] = int(math.ceil((shape[i] - 1) * zooms[i] / pixdim[j] - 1e-6)) + 1
        shape = out
    voxels = int(np.prod(shape))
    total = job["in_channels"] * voxels * np.dtype(job["image_dtype"]).itemsize + _NPY_HEADER
    if "label" in job["files"]:
        total += voxels * np.dtype(_LABEL_DTYPE).itemsize + _NPY_HEADER
    return int(total)


_CHAINS: dict[str, Compose] = {}  # per process: one chain per settings


def _save_npy(path: Path, array: np.ndarray) -> int:
    """Write ``array`` in Fortran order to ``path`` atomically (temp file, fsync, ``os.replace``); return its size."""
    data = np.asfortranarray(array)
    atomic_write(path, lambda f: np.save(f, data, allow_pickle=False))
    return path.stat().st_size


def _stats(image: np.ndarray) -> dict[str, float]:
    values = image.astype(np.float32, copy=False).reshape(-1)
    p_low, p_high = np.percentile(values, [0.5, 99.5])
    return {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean(dtype=np.float64)),
        "std": float(values.std(dtype=np.float64)),
        "p0.5": float(p_low),
        "p99.5": float(p_high),
    }


def _process_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Preprocess one volume and write its files. Returns ``{"entry": ...}`` or ``{"error": "..."}``."""
    start = time.perf_counter()
    source = job["source"]
    try:
        with_label = "label" in source
        key = json.dumps([job["settings"], with_label, job["margin"]], sort_keys=True)
        if key not in _CHAINS:
            _CHAINS[key] = _chain(job["settings"], with_label, job["margin"])
        out = _CHAINS[key]({k: source[k] for k in ("image", "label") if k in source})
        image = out["image"]
        array = image.detach().cpu().numpy()
        stored = array.astype(job["image_dtype"])
        if not np.isfinite(stored).all():
            raise ValueError(
                f"values beyond the {job['image_dtype']} range after preprocessing (min {array.min():g}, max "
                f"{array.max():g}); use --image-dtype float32"
            )
        files, sizes = job["files"], {}
        out_dir = Path(job["out_dir"])
        label_array = None
        if with_label:
            label = out["label"].detach().cpu().numpy()
            if label.shape[1:] != array.shape[1:]:
                raise ValueError(f"label shape {label.shape} differs from image shape {array.shape} after resampling")
            low, high = float(label.min()), float(label.max())
            if low < 0 or high > np.iinfo(_LABEL_DTYPE).max:
                raise ValueError(f"label values {low:g}..{high:g} do not fit {_LABEL_DTYPE}")
            label_array = np.rint(label).astype(_LABEL_DTYPE)
        sizes["image"] = _save_npy(out_dir / files["image"], stored)
        if label_array is not None:
            sizes["label"] = _save_npy(out_dir / files["label"], label_array)
        first = _files_of(source["image"])[0]
        original = nib.load(first)
        box = [out.get("foreground_start_coord"), out.get("foreground_end_coord")]
        entry = {
            "name": job["name"],
            "split": job["split"],
            "source": dict(source),
            "files": dict(files),
            "bytes": sizes,
            "shape": [int(s) for s in stored.shape],
            "dtype": {"image": job["image_dtype"], **({"label": _LABEL_DTYPE} if with_label else {})},
            "spacing": [float(s) for s in image.pixdim],
            "affine": np.asarray(image.affine, dtype=float).tolist(),
            "foreground_box": [np.asarray(b).astype(int).tolist() if b is not None else None for b in box],
            "original_shape": [int(s) for s in original.shape],
            "original_affine": np.asarray(original.affine, dtype=float).tolist(),
            "original_spacing": [float(s) for s in original.header.get_zooms()[:3]],
            "stats": _stats(stored),
            "seconds": round(time.perf_counter() - start, 3),
        }
        return {"entry": entry}
    except Exception as err:  # reported by the parent, naming the file
        return {"error": f"{_files_of(source['image'])[0]}: preprocessing failed: {type(err).__name__}: {err}"}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Iterator[tuple[Any, Any]]:
    """Yield ``(job, fn(job))`` as the jobs finish: in this process for ``workers <= 1``, else in a process pool.

    Closing the generator early cancels the jobs not started and waits for the running ones.
    """
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, fn(job)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(threads,)) as pool:
        pending: dict[Future, Any] = {pool.submit(fn, job): job for job in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool as err:
                        raise RuntimeError(
                            f"a preprocessing worker process died (out of memory?) while working on {job['name']} or "
                            f"another volume: {err}; rerun with fewer --workers (finished volumes are kept)."
                        ) from err
                    yield job, result
        finally:
            for future in pending:
                future.cancel()


# --------------------------------------------------------------------------------------------------
# the preprocessing run
# --------------------------------------------------------------------------------------------------


def _free_bytes(path: Path) -> tuple[Path, int]:
    """Free bytes on the disk of ``path`` (or of its nearest existing parent)."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path, int(shutil.disk_usage(path).free)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _volume_name(source: Mapping[str, Any], taken: set[str]) -> str:
    base = os.path.basename(_files_of(source["image"])[0])
    for suffix in (".nii.gz", ".nii", ".npy", ".npz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base) or "volume"
    name, k = base, 1
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


class _Lock:
    """``OUT_DIR/.preprocess.lock`` (pid and host): one preprocessing run per folder at a time."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / _LOCK_NAME

    def __enter__(self) -> _Lock:
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text(encoding="utf-8", errors="replace").split()
                pid = int(owner[0]) if owner and owner[0].isdigit() else -1
                host = owner[1] if len(owner) > 1 else ""
                alive = host != socket.gethostname() or (pid > 0 and _pid_alive(pid))
                if alive:
                    raise RuntimeError(
                        f"{self.path.parent} is being preprocessed by process {pid} on {host or 'an unknown host'} "
                        f"({self.path}); wait for it, or delete {self.path} if no such run is active."
                    ) from None
                logger.info(f"removing the stale lock {self.path} of process {pid} (no longer running)")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(me + "\n")
            return self
        raise RuntimeError(f"could not take the lock {self.path}; delete it if no preprocessing run is active.")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_temp_files(out_dir: Path) -> int:
    """Delete the temporary files an interrupted run left (``.<name>.XXXX.tmp`` of :func:`atomic_write`)."""
    removed = 0
    for folder, pattern in ((out_dir / "images", ".*.npy.*.tmp"), (out_dir / "labels", ".*.npy.*.tmp")):
        for path in folder.glob(pattern) if folder.is_dir() else ():
            path.unlink(missing_ok=True)
            removed += 1
    for path in out_dir.glob(f".{MANIFEST_NAME}.*.tmp"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _plan(
    dataset_dir: Path,
    settings: dict[str, Any],
    labels: bool,
    in_channels: int,
    image_dtype: str,
    margin: int,
    out: Path,
) -> list[dict[str, Any]]:
    """One job per datalist entry of the training and validation lists, in datalist order."""
    raw = read_json(dataset_dir / "datalist.json")
    if not isinstance(raw, dict):
        raise ValueError(f"{dataset_dir / 'datalist.json'}: expected a JSON object with a 'training' list.")
    splits = [s for s in _SPLITS if isinstance(raw.get(s), list) and raw[s]]
    if not splits:
        raise ValueError(
            f"{dataset_dir / 'datalist.json'}: no non-empty {' or '.join(repr(s) for s in _SPLITS)} list; keys "
            f"present: {sorted(raw)}."
        )
    jobs, taken = [], set()
    for split in splits:
        for item in load_datalist(dataset_dir, split):
            source = {"image": item["image"]}
            if labels and "label" in item:
                source["label"] = item["label"]
            name = _volume_name(source, taken)
            files = {"image": f"images/{name}.npy", **({"label": f"labels/{name}.npy"} if "label" in source else {})}
            jobs.append(
                {
                    "name": name,
                    "split": split,
                    "source": source,
                    "files": files,
                    "settings": settings,
                    "margin": margin,
                    "image_dtype": image_dtype,
                    "in_channels": in_channels,
                    "out_dir": str(out),
                }
            )
    return jobs


def preprocess_dataset(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    modality: str,
    *,
    preset: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    spacing: Sequence[float] | float | None = None,
    margin: int = FOREGROUND_MARGIN,
    in_channels: int = 1,
    image_dtype: str = "float16",
    labels: bool = True,
) -> dict[str, Any]:
    """Apply the deterministic transforms of a data preset once to every volume of a Decathlon datalist.

    Steps, in order (nothing is written before step 4):

    1. ``DATASET_DIR/datalist.json`` is read (its ``"training"`` and ``"validation"`` lists, with
       :func:`~monai_mae.data.load_datalist`); a missing datalist is an error naming the folder (no
       synthetic data is generated here).
    2. Resume: if ``OUT_DIR`` holds a manifest, its settings must equal this run's (else an error
       naming both); volumes whose entry exists, whose source files are the same and whose output
       files exist with the recorded size are kept; all others (also torn outputs of a killed run)
       are redone.
    3. Every volume still to do is checked (:func:`~monai_mae.data.check_volume` on each file: a
       readable, complete NIfTI, 3D or 4D with ``in_channels``, finite non-singular affine, not all
       NaN/Inf, a label of non-negative integers; image and label of the same shape and grid). Bad
       volumes stop the run with one ``ValueError`` naming each file and why, or with ``skip_bad``
       are skipped with a warning and listed under ``"skipped"`` in the manifest. The disk space
       needed (an upper bound from the headers: the resampled shape times the bytes per voxel) and
       the free space on ``OUT_DIR``'s disk are logged; the run stops if it does not fit.
    4. The volumes are processed in ``workers`` processes with :func:`get_deterministic_transforms`
       and written atomically (temporary file, fsync, ``os.replace``); the manifest is rewritten
       atomically after each volume, and a progress line (i/N, name, seconds, MB) is logged.

    Args:
        dataset_dir: folder with ``datalist.json`` (paths relative to it).
        out_dir: output folder, created if needed.
        modality: ``"ct"`` or ``"mri"``; must agree with the preset's modality.
        preset: keyword-only. Data preset name, JSON path or dict; defaults to the packaged preset of
            ``modality``.
        workers: keyword-only. Worker processes; ``<= 1`` works in this process. Defaults to
            ``min(8, os.cpu_count())``.
        skip_bad: keyword-only. Skip volumes that fail the input checks or the preprocessing, with a
            warning, instead of stopping. Defaults to False.
        spacing: keyword-only. Overrides the preset's ``pixdim`` (mm, one or three numbers). Defaults to None.
        margin: keyword-only. Voxels kept around the foreground box. Defaults to :data:`FOREGROUND_MARGIN`.
        in_channels: keyword-only. Channels of each image (a 4D file's 4th axis, or one file per
            channel). Defaults to 1.
        image_dtype: keyword-only. ``"float16"`` (default) or ``"float32"``.
        labels: keyword-only. Also store the labels the datalist names. Defaults to True.

    Returns:
        The final manifest: ``format``, ``format_version``, ``package_version``, ``complete``,
        ``dataset_dir``, ``preset`` (``name``, ``source``, ``settings`` from :func:`preprocess_settings`,
        the raw ``preset``), ``storage`` (layout, order, dtypes, margin), ``splits`` (names per split),
        ``volumes`` (one entry per finished volume: ``name``, ``split``, ``source``, ``files``,
        ``bytes``, ``shape``, ``dtype``, ``spacing``, ``affine``, ``foreground_box``,
        ``original_shape``, ``original_affine``, ``original_spacing``, ``stats`` (min, max, mean,
        std, p0.5, p99.5 of the stored image), ``seconds``) and ``skipped``.

    Raises:
        FileNotFoundError: when ``dataset_dir`` or its ``datalist.json`` is missing.
        ValueError: for bad arguments, a preset whose modality differs from ``modality``, a manifest
            in ``out_dir`` made with other settings, bad input files (without ``skip_bad``; nothing is
            written), or a volume whose preprocessing fails (without ``skip_bad``; finished volumes are
            recorded, a rerun resumes).
        OSError: ``ENOSPC`` when the estimated output does not fit on ``out_dir``'s disk.
        RuntimeError: when another run holds ``out_dir``'s lock, or a worker process dies.

    Examples::

        >>> import tempfile
        >>> from monai_mae.data.synthetic import write_synthetic_dataset
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = write_synthetic_dataset(f"{folder}/raw", num=2, num_validation=1, shape=(24, 24, 16))
        ...     manifest = preprocess_dataset(f"{folder}/raw", f"{folder}/pre", "ct", workers=1)
        ...     crops = PreprocessedCropDataset(f"{folder}/pre", roi_size=(16, 16, 8), num_samples=2)[0]
        >>> manifest["complete"], manifest["splits"], manifest["volumes"][0]["dtype"]
        (True, {'training': ['phantom_000'], 'validation': ['phantom_001']}, {'image': 'float16', 'label': 'uint8'})
        >>> [tuple(c["image"].shape) for c in crops], crops[0]["image"].dtype
        ([(1, 16, 16, 8), (1, 16, 16, 8)], torch.float32)

    From the shell::

        python -m monai_mae.data.preprocess /data/Task03_Liver /data/pre/liver --modality ct --workers 8
    """
    dataset_dir, out = Path(dataset_dir), Path(out_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {dataset_dir} not found.")
    if not (dataset_dir / "datalist.json").is_file():
        raise FileNotFoundError(
            f"{dataset_dir} has no datalist.json: expected a Decathlon-style JSON file with 'training' (and "
            f"'validation') lists of image/label paths relative to {dataset_dir}. (The preprocessing never generates "
            "synthetic data; for phantoms run python -m monai_mae.data.synthetic DATASET_DIR first.)"
        )
    image_dtype = look_up_option(image_dtype, _IMAGE_DTYPES)
    if isinstance(in_channels, bool) or not isinstance(in_channels, (int, np.integer)) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}.")
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"margin must be an int >= 0 (voxels), got {margin!r}.")
    workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)

    preset_name, preset_source, raw_preset = _resolve_preset(preset, modality)
    if spacing is not None:
        raw_preset = {**raw_preset, "pixdim": _as_pixdim(spacing)}
    settings = preprocess_settings(raw_preset)
    jobs = _plan(dataset_dir, settings, labels, int(in_channels), image_dtype, int(margin), out)
    storage = {
        "layout": "(C, X, Y, Z)",
        "order": "fortran",
        "format": "npy",
        "image_dtype": image_dtype,
        "label_dtype": _LABEL_DTYPE,
        "foreground_margin": int(margin),
        "in_channels": int(in_channels),
    }

    # resume: what is already done
    done: dict[str, dict[str, Any]] = {}
    created = _now()
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        old = _load_manifest(manifest_path)
        differences = [
            f"{key}: {manifest_path} has {old_value!r}, this run has {new_value!r}"
            for key, old_value, new_value in [(k, old["preset"]["settings"].get(k), v) for k, v in settings.items()]
            + [(f"storage.{k}", old.get("storage", {}).get(k), v) for k, v in storage.items()]
            if old_value != new_value
        ]
        if differences:
            raise ValueError(
                f"{out} was preprocessed with other settings ({'; '.join(differences)}); use another OUT_DIR, or "
                f"delete {out} to start again."
            )
        created = old.get("created", created)
        previous = {entry["name"]: entry for entry in old.get("volumes", [])}
        for job in jobs:
            entry = previous.get(job["name"])
            if entry is not None and entry["source"] == job["source"] and not _missing_files(out, entry):
                done[job["name"]] = entry
    todo = [job for job in jobs if job["name"] not in done]
    if done:
        logger.info(f"preprocess: {len(done)} of {len(jobs)} volumes already done in {out}; {len(todo)} to do")

    # input checks (nothing written yet)
    skipped: list[dict[str, Any]] = []
    estimate = 0
    if todo:
        logger.info(f"preprocess: checking {len(todo)} input volume(s) with {workers} worker(s)")
        checks = dict((job["name"], result) for job, result in _run(_check_job, todo, workers))
        bad = [(job, checks[job["name"]]["reasons"]) for job in todo if checks[job["name"]]["reasons"]]
        if bad and not skip_bad:
            listed = "\n  ".join(reason for _, reasons in bad for reason in reasons)
            raise ValueError(
                f"{len(bad)} of {len(jobs)} volumes failed the input checks; nothing was written (pass --skip-bad / "
                f"skip_bad=True to skip them):\n  {listed}"
            )
        for job, reasons in bad:
            logger.warning(f"preprocess: skipping {job['name']} (--skip-bad): " + " | ".join(reasons))
            skipped.append({"name": job["name"], "split": job["split"], "source": job["source"], "reasons": reasons})
        bad_names = {job["name"] for job, _ in bad}
        if len(bad_names) == len(jobs):
            raise ValueError(f"every one of the {len(jobs)} volumes failed the input checks; nothing to preprocess.")
        todo = [job for job in todo if job["name"] not in bad_names]
        estimate = sum(checks[job["name"]]["bytes"] for job in todo)
    where, free = _free_bytes(out)
    logger.info(
        f"preprocess: {len(todo)} volume(s) to write need at most {_size(estimate)} (from the headers: resampled "
        f"shape x bytes per voxel, before the foreground crop); {_size(free)} free on the disk of {where}"
    )
    if estimate > free:
        raise OSError(
            errno.ENOSPC,
            f"not enough disk space for the preprocessed volumes: up to {_size(estimate)} needed, {_size(free)} free "
            f"on the disk of {where}; free some space or choose another OUT_DIR",
        )

    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        removed = _remove_temp_files(out)
        if removed:
            logger.info(f"preprocess: removed {removed} temporary file(s) left by an interrupted run")
        skipped_names = {s["name"] for s in skipped}
        planned = [job for job in jobs if job["name"] not in skipped_names]
        order = {job["name"]: i for i, job in enumerate(jobs)}
        manifest: dict[str, Any] = {
            "format": _FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "complete": False,
            "created": created,
            "updated": created,
            "dataset_dir": str(dataset_dir.absolute()),
            "preset": {"name": preset_name, "source": preset_source, "settings": settings, "preset": raw_preset},
            "storage": storage,
            "splits": {s: [j["name"] for j in planned if j["split"] == s] for s in {j["split"]: None for j in jobs}},
            "volumes": [],
            "skipped": skipped,
        }

        def record() -> None:
            manifest["volumes"] = sorted(done.values(), key=lambda e: order[e["name"]])
            manifest["complete"] = len(done) == len(planned)
            _write_manifest(out, manifest)

        record()
        failures: list[str] = []
        results = _run(_process_job, todo, workers)
        try:
            for i, (job, result) in enumerate(results, start=1):
                if "error" in result:
                    if not skip_bad:
                        failures.append(result["error"])
                        break
                    logger.warning(f"preprocess: skipping {job['name']} (--skip-bad): {result['error']}")
                    failed = {"name": job["name"], "split": job["split"], "source": job["source"]}
                    skipped.append({**failed, "reasons": [result["error"]]})
                    planned = [j for j in planned if j["name"] != job["name"]]
                    manifest["splits"][job["split"]].remove(job["name"])
                    record()
                    continue
                entry = result["entry"]
                done[job["name"]] = entry
                record()
                written = sum(entry["bytes"].values())
                logger.info(f"[{i}/{len(todo)}] {job['name']}: {entry['seconds']:.1f} s, {written / 1e6:.1f} MB")
        finally:
            results.close()  # after a failure: cancel the volumes not started, wait for the running ones
        if failures:
            record()
            raise ValueError(
                f"{failures[0]} ({len(done)} of {len(planned)} volumes are finished and recorded in {manifest_path}; "
                "fix or remove that volume, or pass --skip-bad, and rerun to resume)"
            )
        if not manifest["complete"]:
            record()
    total = sum(sum(e["bytes"].values()) for e in done.values())
    logger.info(
        f"preprocess: {len(done)} volume(s), {_size(total)} in {out}" + (f"; {len(skipped)} skipped" if skipped else "")
    )
    return manifest


def _resolve_preset(
    preset: str | os.PathLike[str] | Mapping[str, Any] | None, modality: str
) -> tuple[str, str | None, dict[str, Any]]:
    """``(name, source, preset dict)`` with the preset's modality checked against ``modality``."""
    try:
        modality = look_up_option(modality.lower() if isinstance(modality, str) else modality, MODALITIES)
    except ValueError as err:
        raise ValueError(f"modality={modality!r} is not supported: {err}") from err
    if preset is None:
        preset = modality
    if isinstance(preset, Mapping):
        name, source, data = "custom", None, dict(preset)
    else:
        text = os.fspath(preset)
        data = load_data_preset(text)
        is_path = text.endswith(".json") or os.sep in text
        name = Path(text).stem if is_path else (text[len("data_") :] if text.startswith("data_") else text)
        source = str(Path(text).absolute()) if is_path else f"monai_mae/data/presets/{name}.json"
    preset_modality = data.get("modality")
    if preset_modality is not None and str(preset_modality).lower() != modality:
        raise ValueError(
            f"--modality {modality!r} differs from the modality of the preset {name!r} ({preset_modality!r}); pass a "
            "preset of that modality or the matching --modality."
        )
    data["modality"] = modality
    return name, source, data


# --------------------------------------------------------------------------------------------------
# training from the preprocessed folder
# --------------------------------------------------------------------------------------------------


class PreprocessedCropDataset(torch.utils.data.Dataset):
    """Random crops of preprocessed volumes, read through memory maps: only the crops' bytes are read.

    Item ``i`` maps volume ``i`` of ``split`` with ``np.load(..., mmap_mode="r")`` (opened per item,
    so no file handle crosses a DataLoader fork), cuts ``num_samples`` random crops of ``roi_size``
    and copies only those into memory. A volume smaller than the crop on some axis is padded there
    with zeros, centred, as MONAI's ``SpatialPad`` pads in the training chain (0 is air for a CT
    window and background after the MRI normalisation); every crop position on the padded volume
    is equally likely, as in ``RandSpatialCropSamplesd``.

    Each item is a list of ``num_samples`` dicts ``{"image": float32 tensor (C, *roi_size)}``, with
    ``"label"`` ``(1, *roi_size)``, integer-valued float32, when ``with_label`` — the layout of MONAI's
    ``RandSpatialCropSamplesd``, which ``monai.data.DataLoader`` (``list_data_collate``) flattens into
    a batch of ``batch_size * num_samples`` crops. Crops are random positions, not positive/negative
    sampled around the label as ``RandCropByPosNegLabeld`` does.

    With ``spatial_dims=2`` each crop is one slice across ``slice_axis`` (default the last, axial,
    axis: one contiguous block of the Fortran-ordered file) cut to the 2D ``roi_size``; only that
    slice is read.

    Storage layout (``storage_layout=True``, for batches converted on the GPU): each crop is returned
    as it lies in the file, without dtype conversion or transpose, so a worker only copies the
    crop's rows out of the map. The Fortran-ordered (C, X, Y, Z) crop is viewed as its transpose: a
    C-contiguous tensor (C, Z, Y, X) in the file's dtype (float16 images, or float32 with
    ``--image-dtype float32``; uint8 labels); in 2D the crop's two in-plane axes reversed, e.g.
    (C, Y, X) for axial slices and (C, Z, Y) with ``slice_axis=0``. Padding is the same (zeros,
    centred). :func:`from_storage_layout` turns a collated batch back into exactly the default
    crops (float32, ``(B, C, *roi_size)``) on any device, e.g. after the non-blocking copy
    (:class:`~monai_mae.engines.GPUAugmentPrepareBatch` with ``storage_layout=True``); the copy
    then also moves half the bytes. With several channels (stored interleaved, fastest-varying)
    the copy gathers each channel with a stride.

    Randomness: with ``seed=None`` the positions come from torch's global generator, which a
    DataLoader seeds per worker and per epoch from the main process (so ``torch.manual_seed`` makes
    a run reproducible) and ``transform`` draws from its own state (``monai.data.DataLoader`` reseeds
    it per worker). With an int ``seed`` the crops of item ``i`` and the draws of ``transform`` are a
    function of ``(seed, epoch, i)`` only (:meth:`set_epoch`): use it for fixed validation crops.

    Args:
        out_dir: folder written by :func:`preprocess_dataset` (its manifest is read with
            :func:`read_manifest`).
        split: ``"training"`` or ``"validation"`` (a split of the manifest). Defaults to ``"training"``.
        roi_size: crop size, ``spatial_dims`` ints or one int. Defaults to ``(96, 96, 96)``.
        num_samples: crops per item. Defaults to 1.
        with_label: also return the label crop (every volume of the split must have one). Defaults to False.
        spatial_dims: 3 for volume crops, 2 for slices. Defaults to 3.
        transform: optional callable applied to each crop dict, e.g. MONAI random dict transforms
            (``RandFlipd``, ``RandScaleIntensityd``). Defaults to None.
        seed: None for fresh crops from torch's generator, or an int (see above). Defaults to None.
        slice_axis: keyword-only. Spatial axis (0, 1, 2 or negative) the 2D slices are taken across.
            Defaults to -1.
        preset: keyword-only. The run's data preset; when given, :func:`check_manifest` stops a run
            whose preset differs from the folder's. Defaults to None.
        storage_layout: keyword-only. Return crops in the file's dtype and reversed spatial order
            (see above) instead of float32 ``(C, *roi_size)``. Defaults to False.

    Raises:
        FileNotFoundError / ValueError: from :func:`read_manifest`, :func:`check_manifest`; a
            ``split`` the manifest lacks (lists those present); a bad ``roi_size``, ``num_samples``,
            ``spatial_dims`` or ``slice_axis``; ``with_label`` when a volume has no label (named);
            a ``transform`` with ``storage_layout=True`` (the crops are not in MONAI's layout).

    Examples::

        train_ds = PreprocessedCropDataset("/data/pre/ct", roi_size=(96, 96, 96), num_samples=2,
                                           preset=load_data_preset("ct"))
        loader = monai.data.DataLoader(train_ds, batch_size=2, shuffle=True, num_workers=8, pin_memory=True)
        # 2D: random axial slices cut to 224 x 224
        slices = PreprocessedCropDataset("/data/pre/ct", roi_size=(224, 224), spatial_dims=2, num_samples=8)
        # storage layout: float16 (1, 96, 96, 96) crops as stored (Z, Y, X), converted on the GPU
        fast = PreprocessedCropDataset("/data/pre/ct", num_samples=2, storage_layout=True)
        batch = from_storage_layout(next(iter(monai.data.DataLoader(fast, batch_size=2)))["image"].cuda())
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        split: str = "training",
        roi_size: Sequence[int] | int = (96, 96, 96),
        num_samples: int = 1,
        with_label: bool = False,
        spatial_dims: int = 3,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        seed: int | None = None,
        *,
        slice_axis: int = -1,
        preset: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        storage_layout: bool = False,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        single = isinstance(roi_size, (int, np.integer))
        roi = (int(roi_size),) * spatial_dims if single else tuple(int(s) for s in roi_size)  # type: ignore[union-attr]
        if len(roi) != spatial_dims or any(s < 1 for s in roi):
            raise ValueError(f"roi_size must be {spatial_dims} positive ints (or one int), got {roi_size!r}.")
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}.")
        if slice_axis not in (-3, -2, -1, 0, 1, 2):
            raise ValueError(f"slice_axis must be a spatial axis 0, 1, 2 (or -3..-1), got {slice_axis!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"seed must be an int or None, got {seed!r}.")
        if storage_layout and transform is not None:
            raise ValueError(
                f"transform={transform!r} cannot run with storage_layout=True: the crops keep the file's dtype and "
                "reversed spatial order, not MONAI's float32 (C, *roi_size); pass transform=None and augment the "
                "batch after from_storage_layout (e.g. GPUAugmentPrepareBatch(storage_layout=True)), or leave "
                "storage_layout=False."
            )
        self.out_dir = Path(out_dir)
        self.manifest = read_manifest(self.out_dir)
        if preset is not None:
            check_manifest(self.manifest, preset)
        splits = self.manifest["splits"]
        if not splits.get(split):
            present = {s: len(names) for s, names in splits.items()}
            raise ValueError(f"{self.out_dir}: no volumes in split {split!r}; volumes per split: {present}.")
        by_name = {entry["name"]: entry for entry in self.manifest["volumes"]}
        self.volumes: list[dict[str, Any]] = [by_name[name] for name in splits[split]]
        if with_label:
            unlabelled = [entry["name"] for entry in self.volumes if "label" not in entry["files"]]
            if unlabelled:
                raise ValueError(
                    f"{self.out_dir}: with_label=True but {len(unlabelled)} volume(s) of {split!r} have no label, e.g. "
                    f"{unlabelled[:_MAX_LISTED]}."
                )
        self.split = split
        self.roi_size = roi
        self.num_samples = int(num_samples)
        self.with_label = bool(with_label)
        self.spatial_dims = spatial_dims
        self.transform = transform
        self.seed = None if seed is None else int(seed)
        self.slice_axis = slice_axis % 3
        self.storage_layout = bool(storage_layout)
        self.epoch = 0
        if spatial_dims == 3:
            self._crop: tuple[int, ...] = roi
        else:
            in_plane = iter(roi)
            self._crop = tuple(1 if a == self.slice_axis else next(in_plane) for a in range(3))

    def __len__(self) -> int:
        return len(self.volumes)

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of epoch ``epoch`` when ``seed`` is set (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        return np.random.default_rng([self.seed, self.epoch, index])

    def crop_starts(self, index: int, rng: np.random.Generator | None = None) -> list[tuple[int, int, int]]:
        """``num_samples`` crop positions of volume ``index``: starts on its 3 spatial axes, in the
        coordinates of the volume padded (centred) to at least the crop size. In 2D the entry of
        ``slice_axis`` is the slice index.

        Args:
            index: volume index in the split.
            rng: numpy generator; defaults to the dataset's (see the class docstring).

        Returns:
            A list of ``num_samples`` 3-tuples of ints.
        """
        rng = self._rng(index) if rng is None else rng
        shape = self.volumes[index]["shape"][1:]
        highs = [max(s, r) - r + 1 for s, r in zip(shape, self._crop)]
        return [tuple(int(rng.integers(0, h)) for h in highs) for _ in range(self.num_samples)]  # type: ignore[misc]

    def _cut(self, array: np.ndarray, start: Sequence[int]) -> np.ndarray:
        """Copy the crop at ``start`` (padded coordinates) out of a mapped (C, X, Y, Z) array, zero-padded.

        Returns (C, *roi_size) float32, or with ``storage_layout`` (C, *reversed spatial axes) in the file's dtype.
        """
        src, dst = [], []
        for size, crop, first in zip(array.shape[1:], self._crop, start):
            low = first - (max(size, crop) - size) // 2  # in volume coordinates
            a, b = max(low, 0), min(low + crop, size)
            src.append(slice(a, b))
            dst.append(slice(a - low, b - low))
        region = array[(slice(None), *src)]  # a view of the map: nothing read yet
        padded = any(s.stop - s.start < c for s, c in zip(dst, self._crop))
        if self.storage_layout:  # the Fortran-ordered crop as its C-ordered transpose: rows of the file, no conversion
            shape, dst, region = (array.shape[0], *self._crop[::-1]), dst[::-1], region.transpose(0, 3, 2, 1)
            squeezed, dtype = 3 - self.slice_axis, array.dtype  # (C, Z, Y, X): the slice axis moves
        else:
            shape, squeezed, dtype = (array.shape[0], *self._crop), 1 + self.slice_axis, np.dtype(np.float32)
        out = np.zeros(shape, dtype=dtype) if padded else np.empty(shape, dtype=dtype)
        out[(slice(None), *dst)] = region
        if self.spatial_dims == 2:
            out = out.squeeze(axis=squeezed)
        return np.ascontiguousarray(out)

    def _read(self, index: int, starts: Sequence[Sequence[int]]) -> list[dict[str, torch.Tensor]]:
        """Map the files of volume ``index`` once and copy out the crops at ``starts``; the maps close on return."""
        entry = self.volumes[index]
        samples: list[dict[str, torch.Tensor]] = [{} for _ in starts]
        for key in ("image", "label") if self.with_label else ("image",):
            array = np.load(self.out_dir / entry["files"][key], mmap_mode="r", allow_pickle=False)
            for sample, start in zip(samples, starts):
                sample[key] = torch.from_numpy(self._cut(array, start))
            del array  # unmap now
        return samples

    def read_crop(self, index: int, start: Sequence[int]) -> dict[str, torch.Tensor]:
        """The crop of volume ``index`` at ``start`` (see :meth:`crop_starts`), without ``transform``.

        Returns:
            ``{"image": (C, *roi_size) float32}`` plus ``"label"`` ``(1, *roi_size)`` with ``with_label``;
            with ``storage_layout``, the file's dtypes and the spatial axes reversed.
        """
        return self._read(index, [start])[0]

    def __getitem__(self, index: int) -> list[Any]:
        rng = self._rng(index)
        samples: list[Any] = self._read(index, self.crop_starts(index, rng))
        if self.transform is not None:
            for k, sample in enumerate(samples):
                if self.seed is not None and isinstance(self.transform, Randomizable):
                    self.transform.set_random_state(seed=int(rng.integers(0, 2**31)))
                samples[k] = self.transform(sample)
        return samples


def from_storage_layout(
    batch: torch.Tensor | Mapping[str, Any],
    keys: Sequence[str] = ("image", "label"),
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Turn a batch of storage-layout crops back into MONAI's layout, on the batch's device.

    :class:`PreprocessedCropDataset` with ``storage_layout=True`` returns crops in the file's dtype
    with the spatial axes reversed; after collation a batch is (B, C, Z, Y, X) in 3D, (B, C, W, H) in
    2D. This reverses the spatial axes and converts to ``dtype`` in one copy, giving a contiguous
    (B, C, X, Y, Z) (or (B, C, H, W)) tensor equal to the default path's batch (labels
    integer-valued float32). The copy moves 6 bytes per float16 voxel (about 5 MB per 96^3 crop):
    microseconds at a GPU's memory bandwidth, milliseconds on one CPU core.

    Args:
        batch: a ``(B, C, *S reversed)`` tensor, or a dict whose ``keys`` entries are such tensors
            (other entries and missing keys pass through).
        keys: the dict entries to convert. Defaults to ``("image", "label")``.
        dtype: the result's dtype. Defaults to ``torch.float32``.

    Returns:
        The converted tensor, or a new dict with the converted entries.

    Raises:
        ValueError: for a tensor that is not (B, C, H, W[, D]), or a dict with none of ``keys``.

    Examples::

        >>> stored = torch.arange(6, dtype=torch.float16).reshape(1, 1, 3, 2)  # (B, C, Y, X)
        >>> from_storage_layout(stored)[0, 0]  # (X, Y)
        tensor([[0., 2., 4.],
                [1., 3., 5.]])
    """
    if isinstance(batch, Mapping):
        present = [key for key in keys if isinstance(batch.get(key), torch.Tensor)]
        if not present:
            raise ValueError(f"batch has none of the entries {list(keys)} as tensors; keys are {sorted(batch)}.")
        return {**batch, **{key: from_storage_layout(batch[key], dtype=dtype) for key in present}}
    if not isinstance(batch, torch.Tensor) or batch.ndim not in (4, 5):
        got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"a storage-layout batch must be a (B, C, H, W[, D]) tensor, got {got}.")
    reverse = (0, 1, *range(batch.ndim - 1, 1, -1))  # (B, C, Z, Y, X) -> (B, C, X, Y, Z)
    return batch.permute(reverse).to(dtype=dtype, memory_format=torch.contiguous_format)


def gpu_augment(
    batch: Mapping[str, Any],
    flip_prob: float = 0.1,
    intensity_shift: float = 0.1,
    intensity_scale: float = 0.1,
    generator: torch.Generator | None = None,
    *,
    image_key: str = "image",
    label_key: str = "label",
) -> dict[str, Any]:
    """Random flips and intensity jitter of a batch, per sample, with torch ops on the batch's device.

    Meant for after the (non-blocking) copy to the GPU, in place of per-crop CPU transforms. Each
    sample is flipped along each spatial axis with probability ``flip_prob`` (its label with it),
    then its image becomes ``image * (1 + s) + o`` with ``s ~ U(-intensity_scale, intensity_scale)``
    and ``o ~ U(-intensity_shift, intensity_shift)`` (MONAI's ``RandScaleIntensity`` and
    ``RandShiftIntensity``); labels keep their values. Shapes and dtypes are unchanged; other keys
    pass through.

    Draws, in this order: flips (B, spatial dims), scale (B), shift (B), from ``generator`` on its
    own device (moved to the batch's device) or torch's default generator of the batch's device.

    Args:
        batch: dict with ``image_key`` ``(B, C, *S)`` and optionally ``label_key`` ``(B, C', *S)``, 2D or 3D.
        flip_prob: probability of a flip along each spatial axis, in [0, 1]. Defaults to 0.1.
        intensity_shift: largest offset added to the image, >= 0. Defaults to 0.1.
        intensity_scale: largest relative change of the image's scale, in [0, 1). Defaults to 0.1.
        generator: torch generator for reproducible draws. Defaults to None.
        image_key: keyword-only. Defaults to ``"image"``.
        label_key: keyword-only. Defaults to ``"label"``.

    Returns:
        A new dict with the augmented ``image`` (and ``label``).

    Raises:
        ValueError: for a batch without ``image_key``, an image that is not (B, C, H, W[, D]), a label
            whose batch or spatial shape differs, or options out of range.

    Examples::

        >>> images = torch.arange(8.0).reshape(2, 1, 2, 2)
        >>> out = gpu_augment({"image": images}, flip_prob=1.0, intensity_shift=0.0, intensity_scale=0.0)
        >>> out["image"][0, 0]
        tensor([[3., 2.],
                [1., 0.]])
    """
    check_augment_options(flip_prob, intensity_shift, intensity_scale)
    if image_key not in batch:
        raise ValueError(f"batch has no {image_key!r} entry; keys are {sorted(batch)}.")
    image = batch[image_key]
    if not isinstance(image, torch.Tensor) or image.ndim not in (4, 5):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"batch[{image_key!r}] must be a (B, C, H, W[, D]) tensor, got {got}.")
    label = batch.get(label_key)
    if label is not None and (label.shape[0] != image.shape[0] or label.shape[2:] != image.shape[2:]):
        raise ValueError(
            f"batch[{label_key!r}] of shape {tuple(label.shape)} does not match batch[{image_key!r}] "
            f"{tuple(image.shape)} (batch and spatial sizes)."
        )
    n, dims = image.shape[0], image.ndim - 2
    draw_device = generator.device if generator is not None else image.device
    flips = torch.rand((n, dims), generator=generator, device=draw_device) < float(flip_prob)
    scale = (torch.rand(n, generator=generator, device=draw_device) * 2 - 1) * float(intensity_scale)
    shift = (torch.rand(n, generator=generator, device=draw_device) * 2 - 1) * float(intensity_shift)
    flips = flips.to(image.device, non_blocking=True)
    out = dict(batch)
    tensors = {image_key: image, **({label_key: label} if label is not None else {})}
    for axis in range(dims):
        if float(flip_prob) == 0.0:
            break
        chosen = flips[:, axis].view(n, *([1] * (image.ndim - 1)))  # (B, 1, ...)
        tensors = {key: torch.where(chosen, t.flip(axis + 2), t) for key, t in tensors.items()}
    view = (n, *([1] * (image.ndim - 1)))
    factor = (1.0 + scale).to(image.device, non_blocking=True).view(view).to(image.dtype)
    offset = shift.to(image.device, non_blocking=True).view(view).to(image.dtype)
    if float(intensity_scale) > 0 or float(intensity_shift) > 0:
        tensors[image_key] = tensors[image_key] * factor + offset
    out.update(tensors)
    return out


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_mae.data.preprocess DATASET_DIR OUT_DIR --modality ct|mri [options]``.

    Returns:
        0 on success; errors are reported by ``argparse`` (exit status 2) naming the problem.
    """
    parser = argparse.ArgumentParser(
        prog="python -m monai_mae.data.preprocess",
        description="Apply the deterministic transforms of a data preset once to every volume of a Decathlon "
        "datalist and store them as .npy files for random-crop training (resumable).",
    )
    parser.add_argument("dataset_dir", help="folder with datalist.json")
    parser.add_argument("out_dir", help="output folder (images/, labels/, manifest.json)")
    parser.add_argument("--modality", required=True, choices=MODALITIES)
    parser.add_argument("--preset", default=None, help="data preset name or JSON path (default: the modality's preset)")
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes (default: min(8, CPUs))"
    )
    parser.add_argument("--skip-bad", action="store_true", help="skip bad inputs with a warning instead of stopping")
    parser.add_argument(
        "--spacing", type=float, nargs="+", default=None, metavar="MM", help="override pixdim (1 or 3 numbers, mm)"
    )
    parser.add_argument("--margin", type=int, default=FOREGROUND_MARGIN, help="voxels kept around the foreground box")
    parser.add_argument("--in-channels", type=int, default=1, help="channels per image (default 1)")
    parser.add_argument("--image-dtype", choices=_IMAGE_DTYPES, default="float16")
    parser.add_argument("--no-labels", action="store_true", help="store the images only")
    args = parser.parse_args(argv)
    if args.spacing is not None and len(args.spacing) not in (1, 3):
        parser.error(f"--spacing takes 1 or 3 numbers, got {args.spacing}.")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.setLevel(logging.INFO)
    try:
        manifest = preprocess_dataset(
            args.dataset_dir,
            args.out_dir,
            args.modality,
            preset=args.preset,
            workers=args.workers,
            skip_bad=args.skip_bad,
            spacing=args.spacing,
            margin=args.margin,
            in_channels=args.in_channels,
            image_dtype=args.image_dtype,
            labels=not args.no_labels,
        )
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        parser.error(str(err))
    print(f"preprocessed {len(manifest['volumes'])} volume(s) into {Path(args.out_dir)}; manifest: {MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    from monai_mae.data import preprocess as _module  # the package's copy, so worker processes pickle its functions

    raise SystemExit(_module.main())
