"""Loading and checking Medical Segmentation Decathlon style datalists.

``load_datalist`` reads ``datalist.json`` through MONAI's ``load_decathlon_datalist`` and turns
every problem a user can make into an error that names the file and what was expected;
``validate_datalist`` opens every referenced NIfTI file up front, so that a corrupt or truncated
download stops a run before training starts rather than in the middle of an epoch.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist
from nibabel.filebasedimages import ImageFileError

__all__ = ["check_nifti", "load_datalist", "validate_datalist"]

_PATH_KEYS = ("image", "label")
_CHUNK = 1 << 20


def _as_paths(value: Any) -> list[str]:
    """The file paths of one datalist field (a path, or a list of paths for multi-channel)."""
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [os.fspath(v) for v in value]
    return []


def _read_json(path: Path) -> Any:
    """Parse ``path`` as JSON, raising a ValueError with the file, line and column on bad syntax."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text JSON file ({err}).") from err


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
            outside ``dataset_dir``.

    Examples::

        >>> from monai_mae.data import ensure_dataset, load_datalist
        >>> ensure_dataset("./data/synthetic")
        >>> train_files = load_datalist("./data/synthetic", "training", require_label=True)
        >>> train_files[0]["image"]
        '/abs/path/data/synthetic/imagesTr/phantom_000.nii.gz'
    """
    root = Path(dataset_dir)
    path = root / datalist_name
    if not path.is_file():
        raise FileNotFoundError(
            f"datalist {path} not found: expected a Decathlon-style JSON file with a {key!r} list. "
            "(The bundles generate the synthetic default dataset when datalist.json is absent; "
            "call monai_mae.data.ensure_dataset(dataset_dir) to do the same.)"
        )
    raw = _read_json(path)
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


def check_nifti(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """Open a NIfTI file completely and return its shape.

    Reads the header with nibabel and checks that the file holds all the voxel data the header
    promises. A ``.nii.gz`` is decompressed in 1 MiB chunks (checking the gzip CRC and length)
    rather than loaded as an array, so large volumes cost no memory.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The image shape from the header, e.g. ``(96, 96, 64)``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: ``"{path}: corrupt or truncated NIfTI (...)"`` when the header cannot be read,
            the gzip stream is damaged or cut short, or the voxel data is shorter than the header says.

    Examples::

        >>> check_nifti("imagesTr/phantom_000.nii.gz")
        (96, 96, 64)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: NIfTI file not found.")
    try:
        img = nib.load(path)
        header = img.header
        shape = tuple(int(s) for s in img.shape)
        needed = int(header.get_data_offset()) + int(np.prod(shape)) * np.dtype(header.get_data_dtype()).itemsize
        if path.name.endswith(".gz"):
            size = 0
            with gzip.open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    size += len(chunk)
        else:
            size = path.stat().st_size
        if size < needed:
            raise ValueError(f"voxel data ends at byte {size}, the header needs {needed}")
    except (OSError, EOFError, zlib.error, ValueError, ImageFileError) as err:
        raise ValueError(f"{path}: corrupt or truncated NIfTI ({err})") from err
    return shape


def validate_datalist(items: Sequence[dict], keys: Sequence[str] = ("image",)) -> None:
    """Check every file of a loaded datalist up front, so a bad file stops the run before training.

    ``.nii``/``.nii.gz`` files are opened completely with :func:`check_nifti`; other formats are
    only checked for existence.

    Args:
        items: entries as returned by :func:`load_datalist`.
        keys: fields of each entry to check, e.g. ``("image", "label")``. Defaults to ``("image",)``.

    Returns:
        None.

    Raises:
        ValueError: when an entry lacks one of ``keys`` or a NIfTI file is corrupt or truncated
            (the message names the entry index and the file).
        FileNotFoundError: when a referenced file does not exist.

    Examples::

        >>> items = load_datalist("./data/synthetic", require_label=True)
        >>> validate_datalist(items, keys=("image", "label"))
    """
    for i, item in enumerate(items):
        for key in keys:
            if key not in item:
                raise ValueError(f"datalist entry {i} has no {key!r}; keys present: {sorted(item)}.")
            files = _as_paths(item[key])
            if not files:
                raise ValueError(f"datalist entry {i} [{key!r}] must be a path or list of paths, got {item[key]!r}.")
            for file in files:
                if file.endswith((".nii", ".nii.gz")):
                    try:
                        check_nifti(file)
                    except ValueError as err:
                        raise ValueError(f"datalist entry {i} [{key!r}]: {err}") from err
                elif not os.path.isfile(file):
                    raise FileNotFoundError(f"datalist entry {i} [{key!r}]: file not found: {file}.")
