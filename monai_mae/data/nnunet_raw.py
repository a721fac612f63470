"""Reading an nnU-Net v2 raw dataset folder as datalist entries.

An nnU-Net raw folder (``DatasetXXX_Name``) holds ``dataset.json`` (``channel_names``, ``labels``,
``numTraining``, ``file_ending``), ``imagesTr/CASE_0000{file_ending}`` ... ``CASE_000K`` (one file per
channel), ``labelsTr/CASE{file_ending}`` and optionally ``imagesTs/`` (and ``labelsTs/``).
:func:`read_nnunet_raw` turns it into the lists a Decathlon ``datalist.json`` holds
(``"training"``, ``"validation"``, ``"test"``), each entry ``{"image": path or [one path per channel],
"label": path}`` with absolute paths, so :func:`~monai_mae.data.load_datalist` (and the bundles through
it) read such a folder as it is.

The raw folder holds no validation split. The rule used here:

* ``splits_final.json`` next to ``dataset.json`` (nnU-Net writes it in ``nnUNet_preprocessed/DatasetXXX``;
  copy it over to keep nnU-Net's folds): fold 0's ``"val"`` cases are the validation list, its
  ``"train"`` cases the training list.
* Otherwise ``max(1, round(n / 5))`` of the ``n`` cases, sorted by case identifier, evenly spaced and
  ending with the last one (the 5th, 10th, ... of every five), are the validation list; the others train.
  A folder of a single case trains on it and has no validation list.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_mae.utils import read_json

__all__ = ["SPLITS_NAME", "is_nnunet_raw", "nnunet_modality", "read_nnunet_raw", "validation_cases"]

#: File holding nnU-Net's cross-validation folds, read from the dataset folder when present.
SPLITS_NAME = "splits_final.json"

_REQUIRED = ("channel_names", "labels", "numTraining", "file_ending")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# file endings MONAI reads, with the Python modules that can read them (any one suffices)
_READABLE: dict[str, tuple[str, ...]] = {
    ".nii.gz": ("nibabel",),
    ".nii": ("nibabel",),
    ".nrrd": ("itk", "nrrd"),
    ".nhdr": ("itk", "nrrd"),
    ".mha": ("itk",),
    ".mhd": ("itk",),
    ".png": ("PIL",),
    ".jpg": ("PIL",),
    ".jpeg": ("PIL",),
    ".bmp": ("PIL",),
}


def _module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def is_nnunet_raw(dataset_dir: str | os.PathLike[str]) -> bool:
    """Whether ``dataset_dir`` looks like an nnU-Net v2 raw dataset folder.

    True when it holds a ``dataset.json`` with a ``channel_names`` entry and an ``imagesTr`` folder
    (a Decathlon ``dataset.json`` has ``modality`` instead). The file is only parsed here; its
    other entries are checked by :func:`read_nnunet_raw`.

    Args:
        dataset_dir: a folder.

    Returns:
        True for an nnU-Net v2 raw folder.

    Examples::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     is_nnunet_raw(folder)
        False
    """
    root = Path(dataset_dir)
    path = root / "dataset.json"
    if not (path.is_file() and (root / "imagesTr").is_dir()):
        return False
    try:
        raw = read_json(path)
    except ValueError:
        return True  # an nnU-Net layout with a broken dataset.json: read_nnunet_raw names the problem
    return isinstance(raw, dict) and "channel_names" in raw


def _read_dataset_json(root: Path) -> tuple[dict[str, Any], list[str], str]:
    """``dataset.json`` checked: the dict, the channel names in channel order and the file ending."""
    path = root / "dataset.json"
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object (nnU-Net v2 dataset.json), got {type(raw).__name__}.")
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise ValueError(
            f"{path}: no {', '.join(repr(k) for k in missing)}; an nnU-Net v2 dataset.json needs "
            f"{', '.join(_REQUIRED)}. Keys present: {sorted(raw)}."
        )
    if "dataset" in raw:
        raise ValueError(
            f"{path}: file lists given in 'dataset' are not read; keep the files in imagesTr/labelsTr, "
            "or write a datalist.json next to it (it takes precedence)."
        )
    names = raw["channel_names"]
    if not isinstance(names, dict) or not names:
        raise ValueError(f'{path}: \'channel_names\' must be a non-empty object like {{"0": "CT"}}, got {names!r}.')
    if sorted(names) != [str(i) for i in range(len(names))]:
        raise ValueError(
            f"{path}: 'channel_names' keys must be the channel indices 0..{len(names) - 1}, got {sorted(names)}."
        )
    channels = [str(names[str(i)]) for i in range(len(names))]
    ending = raw["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise ValueError(f"{path}: 'file_ending' must be a string like '.nii.gz', got {ending!r}.")
    readers = _READABLE.get(ending.lower())
    if readers is None:
        raise ValueError(
            f"{path}: file_ending {ending!r} is not read by MONAI's image readers here; supported: "
            f"{', '.join(_READABLE)}."
        )
    if not any(_module_available(module) for module in readers):
        raise ValueError(
            f"{path}: file_ending {ending!r} needs the Python package {' or '.join(readers)} "
            "(e.g. pip install itk) for MONAI to read it; none is installed."
        )
    count = raw["numTraining"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{path}: 'numTraining' must be a non-negative int, got {count!r}.")
    return raw, channels, ending


def _case_files(root: Path, images: str, labels: str, channels: Sequence[str], ending: str) -> dict[str, dict]:
    """Entries of one images folder (and its labels folder, if any), by case identifier."""
    found: dict[str, dict[int, str]] = {}
    folder = root / images
    for file in sorted(folder.iterdir()):
        if file.name.startswith(".") or not file.name.endswith(ending) or not file.is_file():
            continue  # hidden files and other formats are not part of the dataset
        match = _CHANNEL.match(file.name[: -len(ending)])
        if match is None:
            raise ValueError(
                f"{file}: name without the channel suffix; nnU-Net images are named CASE_XXXX{ending} "
                "(XXXX = 4-digit channel index, e.g. _0000)."
            )
        index = int(match["channel"])
        if index >= len(channels):
            raise ValueError(
                f"{file}: channel {index}, but dataset.json's channel_names has {len(channels)} channel(s) "
                f"{channels} (indices 0..{len(channels) - 1})."
            )
        found.setdefault(match["case"], {})[index] = str(file)
    entries: dict[str, dict] = {}
    for case, files in found.items():
        absent = [folder / f"{case}_{i:04d}{ending}" for i in range(len(channels)) if i not in files]
        if absent:
            raise ValueError(
                f"case {case!r} of {folder}: missing channel file(s) {', '.join(str(p) for p in absent)}; "
                f"dataset.json's channel_names has {len(channels)} channel(s) {channels}."
            )
        paths = [files[i] for i in range(len(channels))]
        entries[case] = {"image": paths[0] if len(paths) == 1 else paths}
    label_folder = root / labels
    if label_folder.is_dir():
        label_files = {
            file.name[: -len(ending)]: file
            for file in sorted(label_folder.iterdir())
            if file.name.endswith(ending) and not file.name.startswith(".") and file.is_file()
        }
        orphans = sorted(set(label_files) - set(entries))
        if orphans:
            raise ValueError(
                f"{label_files[orphans[0]]}: label without image (no {folder / (orphans[0] + '_0000' + ending)})"
                + (f"; {len(orphans) - 1} more label(s) without image." if len(orphans) > 1 else ".")
            )
        unlabelled = sorted(set(entries) - set(label_files))
        if label_files and unlabelled:
            raise ValueError(
                f"case {unlabelled[0]!r} of {folder} has no label {label_folder / (unlabelled[0] + ending)}"
                + (f" ({len(unlabelled)} cases without label)." if len(unlabelled) > 1 else ".")
            )
        for case, file in label_files.items():
            entries[case]["label"] = str(file)
    return entries


def validation_cases(cases: Sequence[str]) -> list[str]:
    """The validation cases of the default split: every fifth case in sorted order, at least one.

    ``max(1, round(n / 5))`` cases, evenly spaced over the sorted identifiers and ending with the last
    one; none when there are fewer than two cases.

    Args:
        cases: case identifiers.

    Returns:
        The validation identifiers, sorted.

    Examples::

        >>> validation_cases([f"case_{i:02d}" for i in range(10)])
        ['case_04', 'case_09']
        >>> validation_cases(["b", "a", "c"])
        ['c']
        >>> validation_cases(["a"])
        []
    """
    ordered = sorted(cases)
    n = len(ordered)
    if n < 2:
        return []
    n_val = max(1, round(n / 5))
    return [ordered[(j + 1) * n // n_val - 1] for j in range(n_val)]


def _read_splits(path: Path, cases: Sequence[str]) -> tuple[list[str], list[str]]:
    """Fold 0 of nnU-Net's ``splits_final.json``: (training, validation) case identifiers, checked."""
    folds = read_json(path)
    if not isinstance(folds, list) or not folds or not isinstance(folds[0], dict):
        raise ValueError(f'{path}: expected a list of folds like [{{"train": [...], "val": [...]}}, ...].')
    fold = folds[0]
    split = []
    for key in ("train", "val"):
        ids = fold.get(key)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{path}: fold 0 must have a {key!r} list of case identifiers, got {ids!r:.80}.")
        unknown = sorted(set(ids) - set(cases))
        if unknown:
            raise ValueError(
                f"{path}: fold 0 {key!r} names case(s) {unknown[:10]} that imagesTr does not hold "
                f"({len(cases)} cases found)."
            )
        split.append(ids)
    both = sorted(set(split[0]) & set(split[1]))
    if both:
        raise ValueError(f"{path}: fold 0 has case(s) {both[:10]} in both 'train' and 'val'.")
    return split[0], split[1]


def read_nnunet_raw(dataset_dir: str | os.PathLike[str]) -> dict[str, list[dict]]:
    """Read an nnU-Net v2 raw dataset folder into Decathlon-style lists.

    The cases of ``imagesTr`` are split into ``"training"`` and ``"validation"`` by fold 0 of
    ``splits_final.json`` when the folder holds one, else by :func:`validation_cases`; ``imagesTs``
    gives ``"test"``. A single-channel image is one path, a multi-channel image the list of its
    channel files in channel order (MONAI's ``LoadImaged`` stacks them as channels). ``labelsTr``
    (``labelsTs``) gives each entry its ``"label"``; without that folder the entries have none
    (unlabelled images, enough for pretraining).

    Args:
        dataset_dir: the raw folder, e.g. ``nnUNet_raw/Dataset001_Liver``.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` with absolute paths, entries
        sorted by case identifier; a list is empty when there is nothing for it.

    Raises:
        FileNotFoundError: when ``dataset.json`` or ``imagesTr`` is missing.
        ValueError: naming the file and the problem, for a ``dataset.json`` without the nnU-Net v2
            entries (or with a ``file_ending`` MONAI cannot read here), an image not named
            ``CASE_XXXX{file_ending}``, a missing channel file of a case, a channel index beyond
            ``channel_names``, a label without image or a case without label (when ``labelsTr``
            exists), a ``numTraining`` that differs from the cases found, a malformed
            ``splits_final.json``.

    Examples::

        >>> import tempfile
        >>> import nibabel as nib, numpy as np
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     root = Path(folder)
        ...     for sub in ("imagesTr", "labelsTr"):
        ...         (root / sub).mkdir()
        ...     _ = (root / "dataset.json").write_text('{"channel_names": {"0": "CT"}, '
        ...         '"labels": {"background": 0, "liver": 1}, "numTraining": 2, "file_ending": ".nii.gz"}')
        ...     for case in ("liver_0", "liver_1"):
        ...         for sub, name in (("imagesTr", case + "_0000"), ("labelsTr", case)):
        ...             nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)),
        ...                      root / sub / (name + ".nii.gz"))
        ...     lists = read_nnunet_raw(folder)
        ...     [(Path(e["image"]).name, Path(e["label"]).name) for e in lists["validation"]]
        [('liver_1_0000.nii.gz', 'liver_1.nii.gz')]
    """
    root = Path(dataset_dir)
    if not (root / "dataset.json").is_file():
        raise FileNotFoundError(f"{root / 'dataset.json'} not found: expected an nnU-Net v2 raw dataset folder.")
    if not (root / "imagesTr").is_dir():
        raise FileNotFoundError(f"{root / 'imagesTr'} not found: an nnU-Net raw folder keeps its images there.")
    raw, channels, ending = _read_dataset_json(root)
    train = _case_files(root, "imagesTr", "labelsTr", channels, ending)
    if len(train) != raw["numTraining"]:
        raise ValueError(
            f"{root / 'dataset.json'}: numTraining is {raw['numTraining']}, but {root / 'imagesTr'} holds "
            f"{len(train)} case(s) of {len(channels)} channel(s) with file ending {ending!r}."
        )
    test = _case_files(root, "imagesTs", "labelsTs", channels, ending) if (root / "imagesTs").is_dir() else {}
    splits = root / SPLITS_NAME
    if splits.is_file():
        train_ids, val_ids = _read_splits(splits, sorted(train))
    else:
        val_ids = validation_cases(sorted(train))
        train_ids = [case for case in sorted(train) if case not in set(val_ids)]
    return {
        "training": [train[case] for case in sorted(train_ids)],
        "validation": [train[case] for case in sorted(val_ids)],
        "test": [test[case] for case in sorted(test)],
    }


def nnunet_modality(dataset_dir: str | os.PathLike[str]) -> str:
    """The data preset (``"ct"`` or ``"mri"``) for an nnU-Net raw folder, from its ``channel_names``.

    ``"ct"`` when every channel is named ``CT`` (nnU-Net's CT normalisation: a fixed intensity window),
    ``"mri"`` when none is (nnU-Net's z-score normalisation of every other channel name, as the
    ``mri`` preset does per channel). A mix of CT and other channels fits neither preset.

    Args:
        dataset_dir: the raw folder.

    Returns:
        ``"ct"`` or ``"mri"``.

    Raises:
        ValueError: for a mix of ``CT`` and other channels, naming the channels; or from
            :func:`read_nnunet_raw`'s checks of ``dataset.json``.

    Examples::

        --modality '$monai_mae.data.nnunet_modality(@dataset_dir)'   # a bundle setting on the command line
    """
    root = Path(dataset_dir)
    _, channels, _ = _read_dataset_json(root)
    is_ct = [name.strip().upper() == "CT" for name in channels]
    if all(is_ct):
        return "ct"
    if not any(is_ct):
        return "mri"
    raise ValueError(
        f"{root / 'dataset.json'}: channel_names {channels} mix CT and other channels; neither the ct preset "
        "(one HU window for every channel) nor the mri preset (z-score per channel) fits them all."
    )
