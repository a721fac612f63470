"""Checks before anything is written: each input volume, and the disk space the outputs will take.

:func:`check_job` runs in the worker processes, one volume at a time: the files are readable
volumes (:func:`~monai_mae.data.check_volume`), image and label lie on the same voxel grid, and an
upper bound of the volume's output bytes comes from the headers alone. :func:`check_disk_space`
compares the sum with the free space of the output folder's disk.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from monai_mae.data.datalist import check_volume
from monai_mae.data.preprocess.settings import LABEL_DTYPE

__all__ = ["check_disk_space", "check_job", "estimate_bytes", "files_of", "format_size", "free_bytes"]

logger = logging.getLogger(__name__)

_NPY_HEADER = 128  # bytes of a .npy header of a 4D array (estimate only)


def files_of(value: Any) -> list[str]:
    """A datalist ``image`` entry (one path or one path per channel) as a list of paths."""
    return [os.fspath(value)] if isinstance(value, (str, os.PathLike)) else [os.fspath(v) for v in value]


def _file_problems(images: list[str], label: str | None, in_channels: int, allow_nonfinite: bool) -> list[str]:
    """:func:`~monai_mae.data.check_volume` of each file: the reasons it gives, one per bad file."""
    reasons: list[str] = []
    per_file = {"in_channels": in_channels // len(images), "allow_nonfinite": allow_nonfinite}
    checks = [(file, per_file) for file in images]
    checks += [(label, {"expect_label": True})] if label is not None else []
    for file, options in checks:
        try:
            check_volume(file, **options)
        except (ValueError, FileNotFoundError) as err:
            reasons.append(str(err))
    return reasons


def _grid_problems(images: list[str], label: str | None) -> tuple[list[str], Any]:
    """Files whose shape or affine differs from the first image's; returns the reasons and that image's header."""
    headers = {file: nib.load(file) for file in [*images, *([label] if label is not None else [])]}
    first = headers[images[0]]
    reasons = []
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
    return reasons, first


def check_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Input checks of one planned volume and an upper bound of its output bytes.

    Args:
        job: a planned volume (``source``, ``files``, ``settings``, ``in_channels``, ``image_dtype``).

    Returns:
        ``{"reasons": [...], "bytes": int}``: why the volume cannot be preprocessed (empty when it
        can), and its estimated output size (0 when it cannot).
    """
    images = files_of(job["source"]["image"])
    label = job["source"].get("label")
    in_channels = job["in_channels"]
    if in_channels % len(images):
        reason = f"{images[0]}: {len(images)} image files cannot hold {in_channels} channel(s)."
        return {"reasons": [reason], "bytes": 0}
    reasons = _file_problems(images, label, in_channels, job["settings"]["replace_nonfinite"])
    if reasons:
        return {"reasons": reasons, "bytes": 0}
    reasons, first = _grid_problems(images, label)
    return {"reasons": reasons, "bytes": 0 if reasons else estimate_bytes(job, first)}


def estimate_bytes(job: Mapping[str, Any], img: Any) -> int:
    """Upper bound of a volume's output bytes after resampling (before the foreground crop), from its header ``img``."""
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
        total += voxels * np.dtype(LABEL_DTYPE).itemsize + _NPY_HEADER
    return int(total)


def free_bytes(path: Path) -> tuple[Path, int]:
    """Free bytes on the disk of ``path`` (or of its nearest existing parent), and that folder."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path, int(shutil.disk_usage(path).free)


def format_size(n: float) -> str:
    """Bytes in decimal units.

    Examples::

        >>> format_size(999), format_size(25_600), format_size(3.2e9)
        ('999 B', '25.6 KB', '3.2 GB')
    """
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def check_disk_space(estimate: int, out: Path, count: int) -> None:
    """Log the estimate of ``count`` volumes next to the free space of ``out``'s disk; ``ENOSPC`` when it does not fit.

    Raises:
        OSError: ``errno.ENOSPC``, naming both sizes and the folder.
    """
    where, free = free_bytes(out)
    logger.info(
        f"preprocess: {count} volume(s) to write need at most {format_size(estimate)} (from the headers: resampled "
        f"shape x bytes per voxel, before the foreground crop); {format_size(free)} free on the disk of {where}"
    )
    if estimate > free:
        raise OSError(
            errno.ENOSPC,
            f"not enough disk space for the preprocessed volumes: up to {format_size(estimate)} needed, "
            f"{format_size(free)} free on the disk of {where}; free some space or choose another OUT_DIR",
        )
