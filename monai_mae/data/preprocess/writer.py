"""The per-volume work of a preprocessing run (in the worker processes): transform, check, write, describe.

:func:`write_volume` applies the deterministic chain to one volume, writes its image (and label) as
Fortran-ordered ``.npy`` files atomically (temporary file, fsync, ``os.replace``), and returns the
volume's manifest entry. Errors come back as a message naming the file, for the run to report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import Compose

from monai_mae.data.preprocess.checks import files_of
from monai_mae.data.preprocess.settings import LABEL_DTYPE, deterministic_chain
from monai_mae.utils import atomic_write

__all__ = ["image_stats", "save_npy", "write_volume"]

_CHAINS: dict[str, Compose] = {}  # per process: one chain per settings


def save_npy(path: Path, array: np.ndarray) -> int:
    """Write ``array`` in Fortran order to ``path`` atomically (temp file, fsync, ``os.replace``); return its size."""
    data = np.asfortranarray(array)
    atomic_write(path, lambda f: np.save(f, data, allow_pickle=False))
    return path.stat().st_size


def image_stats(image: np.ndarray) -> dict[str, float]:
    """``min``, ``max``, ``mean``, ``std``, ``p0.5``, ``p99.5`` of the stored image (mean and std in float64)."""
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


def _chain(job: Mapping[str, Any], with_label: bool) -> Compose:
    """The deterministic chain of ``job``'s settings, built once per process."""
    key = json.dumps([job["settings"], with_label, job["margin"]], sort_keys=True)
    if key not in _CHAINS:
        _CHAINS[key] = deterministic_chain(job["settings"], with_label, job["margin"])
    return _CHAINS[key]


def _stored_label(label: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """The resampled label as uint8 class indices; ``ValueError`` when its grid or values do not fit."""
    if label.shape[1:] != image_shape[1:]:
        raise ValueError(f"label shape {label.shape} differs from image shape {image_shape} after resampling")
    low, high = float(label.min()), float(label.max())
    if low < 0 or high > np.iinfo(LABEL_DTYPE).max:
        raise ValueError(f"label values {low:g}..{high:g} do not fit {LABEL_DTYPE}")
    return np.rint(label).astype(LABEL_DTYPE)


def _entry(job: Mapping[str, Any], out: Mapping[str, Any], stored: np.ndarray, sizes: dict[str, int]) -> dict:
    """The manifest entry of a written volume (``out``: the chain's output, ``stored``: the image as written)."""
    image, source, with_label = out["image"], job["source"], "label" in job["source"]
    original = nib.load(files_of(source["image"])[0])
    box = [out.get("foreground_start_coord"), out.get("foreground_end_coord")]
    return {
        "name": job["name"],
        "split": job["split"],
        "source": dict(source),
        "files": dict(job["files"]),
        "bytes": sizes,
        "shape": [int(s) for s in stored.shape],
        "dtype": {"image": job["image_dtype"], **({"label": LABEL_DTYPE} if with_label else {})},
        "spacing": [float(s) for s in image.pixdim],
        "affine": np.asarray(image.affine, dtype=float).tolist(),
        "foreground_box": [np.asarray(b).astype(int).tolist() if b is not None else None for b in box],
        "original_shape": [int(s) for s in original.shape],
        "original_affine": np.asarray(original.affine, dtype=float).tolist(),
        "original_spacing": [float(s) for s in original.header.get_zooms()[:3]],
        "stats": image_stats(stored),
    }


def write_volume(job: Mapping[str, Any]) -> dict[str, Any]:
    """Preprocess one planned volume and write its files.

    Args:
        job: a planned volume (``name``, ``split``, ``source``, ``files``, ``settings``, ``margin``,
            ``image_dtype``, ``out_dir``).

    Returns:
        ``{"entry": manifest entry}`` (with ``seconds``), or ``{"error": "FILE: preprocessing failed: ..."}``.
    """
    start = time.perf_counter()
    source = job["source"]
    try:
        with_label = "label" in source
        out = _chain(job, with_label)({k: source[k] for k in ("image", "label") if k in source})
        array = out["image"].detach().cpu().numpy()
        stored = array.astype(job["image_dtype"])
        if not np.isfinite(stored).all():
            raise ValueError(
                f"values beyond the {job['image_dtype']} range after preprocessing (min {array.min():g}, max "
                f"{array.max():g}); use --image-dtype float32"
            )
        label = _stored_label(out["label"].detach().cpu().numpy(), array.shape) if with_label else None
        out_dir, files = Path(job["out_dir"]), job["files"]
        sizes = {"image": save_npy(out_dir / files["image"], stored)}
        if label is not None:
            sizes["label"] = save_npy(out_dir / files["label"], label)
        entry = _entry(job, out, stored, sizes)
        entry["seconds"] = round(time.perf_counter() - start, 3)
        return {"entry": entry}
    except Exception as err:  # reported by the parent, naming the file
        return {"error": f"{files_of(source['image'])[0]}: preprocessing failed: {type(err).__name__}: {err}"}
