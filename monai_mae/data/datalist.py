"""Loading and checking Medical Segmentation Decathlon style datalists.

``load_datalist`` reads ``datalist.json`` through MONAI's ``load_decathlon_datalist`` and turns
every problem a user can make into an error that names the file and what was expected;
``validate_datalist`` reads every referenced NIfTI file once up front (:func:`check_volume`: header,
completeness, geometry, voxel values), so that a corrupt, truncated or hostile file stops a run
before training starts rather than in the middle of an epoch, or, with ``skip_bad_files``, is
dropped with a warning naming it.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import load_decathlon_datalist
from nibabel.filebasedimages import ImageFileError

from monai_mae.data.nnunet_raw import SPLITS_NAME, is_nnunet_raw, read_nnunet_raw
from monai_mae.utils import read_json

__all__ = [
    "check_nifti",
    "check_num_classes",
    "check_volume",
    "declared_classes",
    "load_checked_datalist",
    "load_datalist",
    "validate_datalist",
]

logger = logging.getLogger(__name__)

_PATH_KEYS = ("image", "label")
_CHUNK = 1 << 20
_MAX_LISTED = 10  # values or problems quoted in one message
_MAX_DISTINCT = 4096  # distinct label values remembered for the message


def _as_paths(value: Any) -> list[str]:
    """The file paths of one datalist field (a path, or a list of paths for multi-channel)."""
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [os.fspath(v) for v in value]
    return []


def load_datalist(
    dataset_dir: str | os.PathLike[str],
    key: str = "training",
    datalist_name: str = "datalist.json",
    require_label: bool = False,
    check_files: bool = True,
) -> list[dict]:
    """Load one list of a Decathlon-style datalist with paths resolved against ``dataset_dir``.

    Paths in the JSON are relative to ``dataset_dir`` (resolved by
    ``monai.data.load_decathlon_datalist``); every ``image``/``label`` path must stay inside
    ``dataset_dir`` once ``..`` and absolute paths are resolved (symbolic links are not
    followed, so a folder of links to elsewhere is fine). For the ``"test"`` key a plain list of
    image paths is also accepted, as in the Decathlon files.

    A folder without ``datalist_name`` that is an nnU-Net v2 raw dataset (``dataset.json`` with
    ``channel_names``, ``imagesTr/CASE_0000.nii.gz``, ...) is read as one: ``"training"`` and
    ``"validation"`` split its ``imagesTr`` cases, ``"test"`` lists ``imagesTs`` (see
    :func:`~monai_mae.data.nnunet_raw.read_nnunet_raw` for the split rule and the checks).

    Args:
        dataset_dir: dataset folder holding ``datalist_name``.
        key: which list to load (``"training"``, ``"validation"``, ``"test"``, ...).
            Defaults to ``"training"``.
        datalist_name: file name of the datalist inside ``dataset_dir``. Defaults to
            ``"datalist.json"``.
        require_label: every entry must have a ``"label"``. Defaults to False.
        check_files: every referenced ``image``/``label`` file must exist. Defaults to True.
            (Use :func:`validate_datalist` to also read them.)

    Returns:
        List of dicts with absolute ``image`` (and ``label``) paths, as MONAI's
        ``load_decathlon_datalist`` returns them.

    Raises:
        FileNotFoundError: when the datalist is missing, or (``check_files``) a referenced file is.
        ValueError: for malformed JSON, a missing or empty ``key``, an entry that is not a dict or
            has no ``"image"`` (or no ``"label"`` with ``require_label``), or a path that points
            outside ``dataset_dir``; for an nnU-Net raw folder, the problems
            :func:`~monai_mae.data.nnunet_raw.read_nnunet_raw` names, or an empty list.

    Examples::

        >>> import tempfile
        >>> from monai_mae.data import write_synthetic_dataset
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = write_synthetic_dataset(folder, num=2, num_validation=1, shape=(32, 32, 24))
        ...     train_files = load_datalist(folder, "training", require_label=True)
        ...     [Path(train_files[0][key]).relative_to(folder).as_posix() for key in ("image", "label")]
        ['imagesTr/phantom_000.nii.gz', 'labelsTr/phantom_000.nii.gz']
    """
    root = Path(dataset_dir)
    path = root / datalist_name
    if not path.is_file() and is_nnunet_raw(root):
        return _load_nnunet_raw(root, key, require_label)
    if not path.is_file():
        raise FileNotFoundError(
            f"datalist {path} not found: expected a Decathlon-style JSON file with a {key!r} list "
            "(or an nnU-Net raw dataset folder: dataset.json with channel_names, imagesTr/). "
            "(For synthetic phantoms there, run python -m monai_mae.data.synthetic DATASET_DIR, or "
            "call monai_mae.data.ensure_dataset(dataset_dir, synthetic_if_missing=True).)"
        )
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object with a {key!r} list, got {type(raw).__name__}.")
    if key not in raw:
        raise ValueError(f"{path}: no key {key!r}; keys present: {sorted(raw)}.")
    entries = raw[key]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: {key!r} must be a non-empty list of entries, got {entries!r:.80}.")
    plain_test_list = key == "test" and not isinstance(entries[0], dict)  # MONAI's special case
    for i, entry in enumerate(entries):
        if plain_test_list:
            if not _as_paths(entry):
                raise ValueError(f"{path}: {key}[{i}] must be an image path, got {entry!r}.")
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {key}[{i}] must be a dict with an 'image' path, got {entry!r}.")
        if "image" not in entry:
            raise ValueError(f"{path}: {key}[{i}] has no 'image'; keys present: {sorted(entry)}.")
        if require_label and "label" not in entry:
            raise ValueError(f"{path}: {key}[{i}] has no 'label' (require_label=True); entry: {entry}.")
        for field in _PATH_KEYS:
            if field in entry and not _as_paths(entry[field]):
                raise ValueError(
                    f"{path}: {key}[{i}][{field!r}] must be a path or list of paths, got {entry[field]!r}."
                )

    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=root)
    root_abs = os.path.abspath(root)
    for i, item in enumerate(items):
        for field in _PATH_KEYS:
            for file in _as_paths(item.get(field, [])):
                file_abs = os.path.abspath(file)
                if os.path.commonpath([root_abs, file_abs]) != root_abs:
                    raise ValueError(
                        f"{path}: {key}[{i}][{field!r}] = {file_abs} points outside the dataset folder {root_abs}; "
                        "expected a path relative to it."
                    )
                if check_files and not os.path.isfile(file_abs):
                    raise FileNotFoundError(f"{path}: {key}[{i}][{field!r}] file not found: {file_abs}.")
    return items


def _load_nnunet_raw(root: Path, key: str, require_label: bool) -> list[dict]:
    """One list of an nnU-Net raw folder (:func:`load_datalist` without a datalist), checked the same way."""
    lists = read_nnunet_raw(root)
    where = f"{root} (nnU-Net raw dataset, no datalist.json)"
    if key not in lists:
        raise ValueError(f"{where}: no list {key!r}; an nnU-Net raw folder gives {sorted(lists)}.")
    entries = lists[key]
    if not entries:
        count = len(lists["training"]) + len(lists["validation"])
        why = {
            "training": f"every case of imagesTr is in the validation fold of {root / SPLITS_NAME}",
            "validation": f"imagesTr holds {count} case(s); a validation list needs at least 2 cases or a "
            f"{SPLITS_NAME} with a non-empty fold 0 'val'",
            "test": f"there is no {root / 'imagesTs'} or it holds no case",
        }[key]
        raise ValueError(f"{where}: {key!r} is empty: {why}.")
    if require_label:
        unlabelled = [i for i, entry in enumerate(entries) if "label" not in entry]
        if unlabelled:
            folder = "labelsTs" if key == "test" else "labelsTr"
            raise ValueError(
                f"{where}: {key}[{unlabelled[0]}] has no 'label' (require_label=True): no {root / folder} folder; "
                f"entry: {entries[unlabelled[0]]}."
            )
    return entries


def _open_nifti(path: str | os.PathLike[str]) -> Any:
    """``nib.load`` (header only) with the errors of a damaged or absent file turned into ones naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: NIfTI file not found.")
    try:
        return nib.load(path)
    except (OSError, EOFError, zlib.error, ValueError, ImageFileError) as err:
        raise ValueError(f"{path}: corrupt or truncated NIfTI ({err})") from err


def _stream_voxels(path: Path, img: Any, visit: Callable[[np.ndarray], None] | None = None) -> None:
    """Read the voxel data of an opened NIfTI file once, in 1 MiB chunks.

    Checks that the file holds every byte the header promises (and, for ``.nii.gz``, reads to the
    end of the gzip stream so its CRC and length are verified). With ``visit``, each chunk is also
    passed on as a 1D array of voxel values, scaled by the header's slope and intercept.

    Raises:
        ValueError: ``"{path}: corrupt or truncated NIfTI (...)"``.
    """
    try:
        dtype = np.dtype(img.header.get_data_dtype())
        offset = int(getattr(img.dataobj, "offset", img.header.get_data_offset()))
        n_bytes = int(np.prod(img.shape)) * dtype.itemsize
        slope = float(getattr(img.dataobj, "slope", 1.0))
        inter = float(getattr(img.dataobj, "inter", 0.0))
        scaled = (slope, inter) != (1.0, 0.0)
        gzipped = path.name.endswith(".gz")
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            skipped = 0
            while skipped < offset and (chunk := f.read(min(_CHUNK, offset - skipped))):
                skipped += len(chunk)
            if skipped < offset:
                raise ValueError(f"the file ends at byte {skipped}, before the voxel data at byte {offset}")
            read, pending = 0, b""
            while read < n_bytes and (chunk := f.read(min(_CHUNK, n_bytes - read))):
                read += len(chunk)
                if visit is not None:
                    data = pending + chunk if pending else chunk
                    usable = len(data) - len(data) % dtype.itemsize
                    pending = data[usable:]
                    values = np.frombuffer(data[:usable], dtype=dtype)
                    visit(values.astype(np.float64) * slope + inter if scaled else values)
            if read < n_bytes:
                raise ValueError(f"voxel data ends at byte {offset + read}, the header needs {offset + n_bytes}")
            while gzipped and f.read(_CHUNK):
                pass
    except (OSError, EOFError, zlib.error, ValueError, ImageFileError) as err:
        raise ValueError(f"{path}: corrupt or truncated NIfTI ({err})") from err


def check_nifti(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """Open a NIfTI file completely and return its shape.

    Reads the header with nibabel and checks that the file holds all the voxel data the header
    promises. A ``.nii.gz`` is decompressed in 1 MiB chunks (checking the gzip CRC and length)
    rather than loaded as an array, so large volumes cost no memory. :func:`check_volume` does the
    same read and also checks the header's geometry and the voxel values.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The image shape from the header, e.g. ``(96, 96, 64)``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: ``"{path}: corrupt or truncated NIfTI (...)"`` when the header cannot be read,
            the gzip stream is damaged or cut short, or the voxel data is shorter than the header says.

    Examples::

        check_nifti("imagesTr/phantom_000.nii.gz")  # (96, 96, 64)
    """
    img = _open_nifti(path)
    _stream_voxels(Path(path), img)
    return tuple(int(s) for s in img.shape)


class _VoxelStats:
    """Running statistics of voxel values fed chunk by chunk (see :func:`_stream_voxels`)."""

    def __init__(self, labels: bool) -> None:
        self.labels = labels
        self.count = self.n_nan = self.n_inf = self.n_non_integer = 0
        self.low, self.high = math.inf, -math.inf
        self.non_integer: list[float] = []  # a few examples
        self.distinct: set[float] = set()  # label values (capped)

    def __call__(self, values: np.ndarray) -> None:
        self.count += values.size
        finite = np.isfinite(values)
        if not finite.all():
            nan = int(np.isnan(values).sum())
            self.n_nan += nan
            self.n_inf += int(values.size - finite.sum()) - nan
            values = values[finite]
        if values.size == 0:
            return
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        if self.labels:
            fraction = values != np.round(values)
            if fraction.any():
                self.n_non_integer += int(fraction.sum())
                self.non_integer += values[fraction][: _MAX_LISTED - len(self.non_integer)].tolist()
            if len(self.distinct) <= _MAX_DISTINCT:
                self.distinct.update(np.unique(values).tolist())


def _listed(values: Sequence[float]) -> str:
    shown = [int(v) if float(v).is_integer() else float(v) for v in sorted(values)[:_MAX_LISTED]]
    return f"{shown}" + (" ..." if len(values) > _MAX_LISTED else "")


def _check_counts(num_classes: int | None, in_channels: int) -> None:
    """Raise a ValueError naming ``num_classes`` or ``in_channels`` unless they are positive ints (or None)."""
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be an int >= 1 or None, got {num_classes!r}.")
    if isinstance(in_channels, bool) or not isinstance(in_channels, (int, np.integer)) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}.")


def _check_volume(
    path: str | os.PathLike[str],
    expect_label: bool = False,
    num_classes: int | None = None,
    in_channels: int = 1,
    allow_nonfinite: bool = True,
) -> tuple[int, ...]:
    """:func:`check_volume`, returning the spatial shape (the first three axes)."""
    _check_counts(num_classes, in_channels)
    path = Path(path)
    img = _open_nifti(path)
    shape = tuple(int(s) for s in img.shape)
    what = "label" if expect_label else "image"
    if len(shape) < 3 or len(shape) > 4:
        raise ValueError(
            f"{path}: {len(shape)}D {what} of shape {shape}; expected a 3D volume (X, Y, Z), or 4D with the "
            "channels on the 4th axis."
        )
    if 0 in shape:
        raise ValueError(f"{path}: empty {what} of shape {shape} (an axis of size 0).")
    channels = shape[3] if len(shape) == 4 else 1
    expected = 1 if expect_label else in_channels
    if channels != expected:
        raise ValueError(
            f"{path}: {what} of shape {shape} holds {channels} channel(s) (the 4th axis of a 4D file), "
            f"expected {expected}"
            + (" (a label map is one channel of class indices)." if expect_label else f" (in_channels={in_channels}).")
            + " A 4D file is read only with a singleton 4th axis or one entry per channel."
        )
    dtype = np.dtype(img.header.get_data_dtype())
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise ValueError(f"{path}: voxel type {dtype} is not supported; expected integer or floating-point voxels.")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise ValueError(
            f"{path}: non-finite affine (NaN/Inf in the voxel-to-world matrix {np.asarray(affine).tolist()}); "
            "expected finite sform/qform/pixdim header fields."
        )
    if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise ValueError(
            f"{path}: singular affine {affine[:3, :3].tolist()} (a zero voxel size or collapsed axes); "
            "expected three independent axes with non-zero spacing."
        )

    stats = _VoxelStats(labels=expect_label)
    _stream_voxels(path, img, stats)
    n_bad = stats.n_nan + stats.n_inf
    if n_bad == stats.count:
        raise ValueError(f"{path}: every one of the {stats.count} voxels is NaN or Inf; nothing to train on.")
    if expect_label:
        if n_bad:
            raise ValueError(
                f"{path}: label has {stats.n_nan} NaN and {stats.n_inf} Inf voxels; expected integer class indices."
            )
        if stats.n_non_integer:
            raise ValueError(
                f"{path}: label has {stats.n_non_integer} non-integer voxel values "
                f"(e.g. {_listed(stats.non_integer)}); expected integer class indices."
            )
        top = (num_classes - 1) if num_classes is not None else math.inf
        if stats.low < 0 or stats.high > top:
            odd = [v for v in stats.distinct if v < 0 or v > top]
            odd = odd or [v for v in (stats.low, stats.high) if v < 0 or v > top]  # too many distinct values kept
            allowed = f"0..{num_classes - 1} (num_classes={num_classes})" if num_classes is not None else ">= 0"
            raise ValueError(f"{path}: label values {_listed(odd)} outside {allowed}.")
    else:
        if n_bad:
            if not allow_nonfinite:
                raise ValueError(
                    f"{path}: {stats.n_nan} NaN and {stats.n_inf} Inf voxels of {stats.count} (allow_nonfinite=False)."
                )
            logger.warning(
                f"{path}: {stats.n_nan} NaN and {stats.n_inf} Inf voxels of {stats.count}; the preprocessing "
                "replaces them (CT: window minimum a_min, MRI: 0)."
            )
        if stats.low == stats.high:
            logger.warning(
                f"{path}: constant image (every finite voxel = {stats.low:g}): nothing to reconstruct; its crops are "
                "constant and the loss stays finite, but the volume only dilutes training."
            )
    return shape[:3]


def check_volume(
    path: str | os.PathLike[str],
    expect_label: bool = False,
    num_classes: int | None = None,
    *,
    in_channels: int = 1,
    allow_nonfinite: bool = True,
) -> None:
    """Check one NIfTI volume before training: its header, its geometry and every voxel value.

    The file is read once, as :func:`check_nifti` reads it (chunked, so a large volume costs no
    memory), and the voxel values are scanned on the way (after the header's slope/intercept).

    Policy (an error names the file; a warning is logged through ``logging`` naming it):

    * Not a readable, complete NIfTI file: error (as :func:`check_nifti`).
    * Fewer than 3 or more than 4 axes, or an axis of size 0: error.
    * 4D: the 4th axis holds the channels (MONAI's ``LoadImaged(ensure_channel_first=True)`` moves
      it first), so it must be ``in_channels`` long (1 for a label): a singleton 4th axis is read as
      one channel; any other length is an error ("wrong channel count").
    * Non-finite (NaN/Inf) or singular affine: error (resampling and orientation would be garbage).
    * Complex or RGB voxel types: error.
    * Image voxels: all NaN/Inf: error; some NaN/Inf: warning (the transforms of
      :func:`~monai_mae.data.get_pretrain_transforms` replace them), or an error with
      ``allow_nonfinite=False``; a constant (empty) image: warning (its crops are constant, the
      masked loss stays finite).
    * Label voxels (``expect_label``): NaN/Inf, non-integer values, negative values or values
      ``>= num_classes``: error, listing the offending values.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        expect_label: check as a label map of class indices. Defaults to False.
        num_classes: for labels, the number of classes (values must be in ``0..num_classes-1``);
            None only requires non-negative integers. Defaults to None.
        in_channels: keyword-only. Channels an image file must hold. Defaults to 1.
        allow_nonfinite: keyword-only. Accept (with a warning) images with some NaN/Inf voxels.
            Defaults to True.

    Returns:
        None.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: ``"{path}: ..."`` for every rejected case above, or a bad ``num_classes`` /
            ``in_channels`` argument.

    Examples::

        check_volume("imagesTr/phantom_000.nii.gz")
        check_volume("labelsTr/phantom_000.nii.gz", expect_label=True, num_classes=5)
    """
    _check_volume(path, expect_label, num_classes, in_channels, allow_nonfinite)


def _check_item(
    i: int,
    item: Any,
    keys: Sequence[str],
    label_keys: Sequence[str],
    num_classes: int | None,
    in_channels: int,
    allow_nonfinite: bool,
) -> list[tuple[str, str]]:
    """Problems of one datalist entry as ``(exception type name, message)`` pairs (picklable)."""
    if not isinstance(item, Mapping):
        return [("ValueError", f"datalist entry {i} must be a dict, got {item!r:.80}.")]
    problems: list[tuple[str, str]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for key in keys:
        if key not in item:
            problems.append(("ValueError", f"datalist entry {i} has no {key!r}; keys present: {sorted(item)}."))
            continue
        files = _as_paths(item[key])
        if not files:
            problems.append(
                ("ValueError", f"datalist entry {i} [{key!r}] must be a path or list of paths, got {item[key]!r}.")
            )
            continue
        is_label = key in label_keys
        channels = 1 if is_label else in_channels
        if channels % len(files):
            problems.append(
                ("ValueError", f"datalist entry {i} [{key!r}]: {len(files)} files cannot hold {channels} channel(s).")
            )
            continue
        for file in files:
            try:
                if file.endswith((".nii", ".nii.gz")):
                    shapes[file] = _check_volume(file, is_label, num_classes, channels // len(files), allow_nonfinite)
                elif not os.path.isfile(file):
                    raise FileNotFoundError(f"file not found: {file}.")
            except (ValueError, FileNotFoundError) as err:
                problems.append((type(err).__name__, f"datalist entry {i} [{key!r}]: {err}"))
    if not problems and len(set(shapes.values())) > 1:
        listed = ", ".join(f"{file}: {shape}" for file, shape in shapes.items())
        problems.append(
            ("ValueError", f"datalist entry {i}: the volumes of one entry differ in spatial shape ({listed}).")
        )
    return problems


def validate_datalist(
    items: Sequence[dict],
    keys: Sequence[str] = ("image",),
    *,
    skip_bad_files: bool = False,
    label_keys: Sequence[str] = ("label",),
    num_classes: int | None = None,
    in_channels: int = 1,
    allow_nonfinite: bool = True,
    distributed: bool = False,
) -> list[dict]:
    """Check every file of a loaded datalist up front, so a bad file stops the run before training.

    ``.nii``/``.nii.gz`` files go through :func:`check_volume` (each file is read once: header,
    completeness, geometry and voxel values); other formats are only checked for existence. The
    volumes of one entry (image and label, or one file per channel) must share their spatial shape.
    Every entry is checked before anything is raised, so one error lists every bad file.

    Args:
        items: entries as returned by :func:`load_datalist`.
        keys: fields of each entry to check, e.g. ``("image", "label")``. Defaults to ``("image",)``.
        skip_bad_files: keyword-only. False (default): raise if any entry fails. True: drop the failing
            entries, each with a warning naming it and why, and return the rest.
        label_keys: keyword-only. Which of ``keys`` are label maps (checked with
            ``expect_label=True``). Defaults to ``("label",)``.
        num_classes: keyword-only. Number of label classes, see :func:`check_volume`. Defaults to None.
        in_channels: keyword-only. Channels of an image entry (split evenly over its files when it is
            a list of paths). Defaults to 1.
        allow_nonfinite: keyword-only. Accept images with some NaN/Inf voxels (the transforms replace
            them). Defaults to True.
        distributed: keyword-only. When a ``torch.distributed`` process group is initialised, every
            rank checks its share of the entries (``i % world_size == rank``) and the findings are
            gathered, so each file is read once in all and every rank returns the same list. Every
            rank must then call this function (it is a collective). Defaults to False.

    Returns:
        The entries that passed (all of them unless ``skip_bad_files``), in their order.

    Raises:
        ValueError: when an entry lacks one of ``keys`` or a file fails :func:`check_volume` (the
            message names the entry index and the file; several problems are listed together), when
            ``skip_bad_files`` drops every entry, or for a bad ``num_classes`` / ``in_channels``.
        FileNotFoundError: when the only problems are missing files.

    Examples::

        items = load_datalist("./data/synthetic", require_label=True)
        items = validate_datalist(items, keys=("image", "label"), num_classes=5)
        items = validate_datalist(items, skip_bad_files=True)  # drop bad entries with a warning
    """
    _check_counts(num_classes, in_channels)
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    label_keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
    items = list(items)
    rank, world = 0, 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    args = (keys, label_keys, num_classes, in_channels, allow_nonfinite)
    problems = {i: found for i in range(rank, len(items), world) if (found := _check_item(i, items[i], *args))}
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, problems)
        problems = {i: found for part in gathered for i, found in part.items()}
    if not problems:
        return items
    messages = [message for i in sorted(problems) for _, message in problems[i]]
    if skip_bad_files:
        for i in sorted(problems):
            logger.warning(
                f"validate_datalist: skipping datalist entry {i} (skip_bad_files): "
                + " | ".join(m for _, m in problems[i])
            )
        kept = [item for i, item in enumerate(items) if i not in problems]
        if not kept:
            raise ValueError(
                f"every one of the {len(items)} datalist entries failed the checks:\n"
                + "\n".join(messages[:_MAX_LISTED])
            )
        logger.warning(f"validate_datalist: kept {len(kept)} of {len(items)} datalist entries.")
        return kept
    kinds = {kind for found in problems.values() for kind, _ in found}
    error = FileNotFoundError if kinds == {"FileNotFoundError"} else ValueError
    hint = "set skip_bad_files to drop failing entries with a warning instead"
    if len(messages) == 1:
        raise error(f"{messages[0]} ({hint})")
    more = len(messages) - _MAX_LISTED
    shown = "\n  ".join(messages[:_MAX_LISTED]) + (f"\n  ... and {more} more" if more > 0 else "")
    raise error(f"{len(problems)} of {len(items)} datalist entries failed the checks ({hint}):\n  {shown}")


#: File name and ``"format"`` entry of a preprocessing manifest (``monai_mae.data.preprocess.manifest`` takes them
#: from here: the preprocess package imports this module, so this one cannot import it).
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "monai_mae.preprocessed"


def _declared_in(path: Path) -> dict[int, str]:
    """The ``{value: name}`` pairs of the ``"labels"`` of the JSON file ``path``."""
    raw = read_json(path)
    labels = raw.get("labels") if isinstance(raw, dict) else None
    if not isinstance(labels, dict) or (path.name == MANIFEST_NAME and raw.get("format") != MANIFEST_FORMAT):
        return {}  # no labels, or another tool's manifest.json
    declared: dict[int, str] = {}
    for name, value in labels.items():
        if path.name == "dataset.json":  # nnU-Net: name -> value (or a region's values)
            values, label = (value if isinstance(value, list) else [value]), str(name)
        else:  # Decathlon datalist or preprocessed manifest: value -> name
            values, label = [name], str(value)
        for v in values:
            try:
                declared[int(v)] = label
            except (TypeError, ValueError):
                raise ValueError(f"{path}: 'labels' entry {name!r}: {value!r} is not a whole-number label.") from None
    return declared


def declared_classes(dataset_dir: str | os.PathLike[str], datalist_name: str = "datalist.json") -> dict[int, str]:
    """The label values and names a dataset's JSON declares: a Decathlon datalist's ``"labels"``
    (``{"0": "background", "1": "liver"}``) or an nnU-Net raw ``dataset.json``'s (``{"background": 0, "liver": 1}``;
    a region's list of values counts each value).

    A folder written by :func:`~monai_mae.data.preprocess_dataset` (no datalist, a ``manifest.json``) is read too:
    its manifest carries the source datalist's ``"labels"``, so a run that reads only the preprocessed folder
    keeps the class names.

    Returns:
        ``{value: name}``, empty when the file declares no labels (or there is no such file).

    Raises:
        ValueError: for a ``"labels"`` entry that is not a whole number; the message names the file.
    """
    root = Path(dataset_dir)
    for name in (datalist_name, "dataset.json", MANIFEST_NAME):
        path = root / name
        if path.is_file():
            return _declared_in(path)
    return {}


def num_classes_for(dataset_dir: str | os.PathLike[str], default: int = 5, datalist_name: str = "datalist.json") -> int:
    """Output channels for a segmentation of the dataset: the largest label value its JSON declares plus one.

    Args:
        dataset_dir: dataset folder (Decathlon ``datalist.json`` or nnU-Net ``dataset.json``, see
            :func:`declared_classes`).
        default: the answer when the folder or its JSON is missing or declares no labels. Defaults to 5
            (background and the 4 organs of the synthetic phantoms).
        datalist_name: the datalist's file name. Defaults to ``"datalist.json"``.

    Returns:
        ``max(label values) + 1`` (at least 2), or ``default``.

    Raises:
        ValueError: for a ``"labels"`` entry that is not a whole number (the message names the file).

    Examples::

        >>> num_classes_for("no/such/folder")
        5
    """
    declared = declared_classes(dataset_dir, datalist_name)
    return max(max(declared) + 1, 2) if declared else default


def class_names(
    dataset_dir: str | os.PathLike[str], num_classes: int, datalist_name: str = "datalist.json"
) -> list[str]:
    """Names of the foreground classes ``1 .. num_classes - 1`` for metrics and legends, from the dataset's JSON.

    A name the JSON declares (:func:`declared_classes`: Decathlon ``"labels"`` or nnU-Net ``dataset.json``) is
    used with every run of characters other than letters, digits and ``_`` turned into ``_`` (``"left kidney"``
    gives ``left_kidney``, so it can be part of a metric name such as ``val_dice_left_kidney``); an undeclared
    value, or a name that is empty after that or already taken, gives ``class_<value>``.

    Args:
        dataset_dir: dataset folder (a missing folder or JSON gives ``class_1`` ... for every class).
        num_classes: output channels, background included (>= 2).
        datalist_name: the datalist's file name. Defaults to ``"datalist.json"``.

    Returns:
        ``num_classes - 1`` unique names.

    Raises:
        ValueError: for ``num_classes < 2``, or a ``"labels"`` entry that is not a whole number.

    Examples::

        >>> class_names("no/such/folder", 3)
        ['class_1', 'class_2']
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background and one class), got {num_classes!r}.")
    declared = declared_classes(dataset_dir, datalist_name)
    names: list[str] = []
    for value in range(1, num_classes):
        name = re.sub(r"[^0-9A-Za-z_]+", "_", declared.get(value, "")).strip("_")
        name = name if name and name not in names else f"class_{value}"
        names.append(name if name not in names else f"{name}_{value}")
    return names


def check_num_classes(
    dataset_dir: str | os.PathLike[str], num_classes: int, datalist_name: str = "datalist.json"
) -> None:
    """Check that ``num_classes`` (background included) covers every label the dataset's JSON declares.

    A segmentation run with fewer output channels than label values fails deep inside the loss (an index out of
    bounds); this names the setting instead.

    Raises:
        ValueError: when a declared label value is ``num_classes`` or more; the message lists the labels and the
            ``num_classes`` that fits them.
    """
    declared = declared_classes(dataset_dir, datalist_name)
    if declared and max(declared) >= num_classes:
        listed = ", ".join(f"{v} {n}" for v, n in sorted(declared.items())[:_MAX_LISTED])
        raise ValueError(
            f"num_classes={num_classes} is too small for {Path(dataset_dir)}: its labels are {listed}; "
            f"set num_classes to {max(declared) + 1} (e.g. --num_classes {max(declared) + 1})."
        )


def load_checked_datalist(
    dataset_dir: str | os.PathLike[str],
    key: str = "training",
    *,
    require_label: bool = False,
    check: Mapping[str, Any] | None = None,
    preprocessed_dir: str | os.PathLike[str] | None = "",
    num_classes: int | None = None,
) -> list[dict]:
    """The entries a bundle reads: :func:`load_datalist`, then :func:`validate_datalist` when ``check`` is given.

    A run that reads a preprocessed folder (``preprocessed_dir`` set) reads no datalist: the result is an
    empty list and ``dataset_dir`` is not touched (``num_classes`` is checked against the labels the folder's
    manifest carries).

    Args:
        dataset_dir: dataset folder holding ``datalist.json``.
        key: which list to load. Defaults to ``"training"``.
        require_label: keyword-only. Every entry must have a ``"label"``. Defaults to False.
        check: keyword-only. Arguments of :func:`validate_datalist` (``keys``, ``skip_bad_files``,
            ``in_channels``, ...); None: no file check. Defaults to None.
        preprocessed_dir: keyword-only. The bundle's ``preprocessed_dir`` setting. Defaults to ``""``.
        num_classes: keyword-only. A segmentation run's classes: checked against the labels the JSON declares
            (:func:`check_num_classes`). Defaults to None (no check).

    Returns:
        The entries (checked when ``check`` is given), or ``[]`` with ``preprocessed_dir``.

    Raises:
        ValueError: see :func:`load_datalist`, :func:`validate_datalist` and :func:`check_num_classes`.

    Examples::

        items = load_checked_datalist("./data/synthetic", "validation", check={"keys": ["image"]})
    """
    if preprocessed_dir and os.fspath(preprocessed_dir).strip():
        if num_classes is not None:
            check_num_classes(preprocessed_dir, int(num_classes))
        return []
    items = load_datalist(dataset_dir, key, require_label=require_label)
    if num_classes is not None:
        check_num_classes(dataset_dir, int(num_classes))
    return items if check is None else validate_datalist(items, **check)
