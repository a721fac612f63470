"""The bundles' ``preprocessed_dir``: the run's check of the folder and the validation datasets read from it.

Training crops come straight from :class:`~monai_mae.data.PreprocessedCropDataset`; this module adds
what a bundle run needs around it: :func:`check_preprocessed_dir` (the folder exists, is complete
and was made with the run's data preset, before anything is built; one log line says so and that
``cache`` is ignored), :class:`PreprocessedCentreCropDataset` (pretraining validation: the centre
crop of each volume, as the NIfTI chain's ``CenterSpatialCropd``) and
:class:`PreprocessedVolumeDataset` (fine-tuning validation: whole volumes for the sliding window).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from monai_mae.data.preprocess import PreprocessedCropDataset, check_manifest, read_manifest

__all__ = ["PreprocessedCentreCropDataset", "PreprocessedVolumeDataset", "check_preprocessed_dir", "refuse_preprocessed_dir"]

logger = logging.getLogger(__name__)


def check_preprocessed_dir(
    preprocessed_dir: str | os.PathLike[str],
    preset: str | os.PathLike[str] | Mapping[str, Any],
    cache: str | None = None,
    *,
    with_label: bool = False,
    log: bool = True,
) -> dict[str, Any]:
    """Check a bundle's ``preprocessed_dir`` before the run builds anything, and say once what it changes.

    Args:
        preprocessed_dir: folder written by ``python -m monai_mae.data.preprocess``.
        preset: the run's data preset (modality, ``pixdim``, CT window), compared with the folder's by
            :func:`~monai_mae.data.check_manifest`.
        cache: the run's ``cache`` setting, named in the log line as ignored. Defaults to None.
        with_label: keyword-only. Every volume of both splits must have a label (fine-tuning).
            Defaults to False.
        log: keyword-only. Write the log line (False on all ranks but one). Defaults to True.

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: when the folder holds no ``manifest.json`` (the message names it and how to make one).
        ValueError: a setting of the folder differs from the run's preset (both values named), the
            preprocessing is incomplete or its files are damaged, a split is empty, or, with
            ``with_label``, volumes without a label (named).

    Examples::

        manifest = check_preprocessed_dir("/data/pre/ct", load_data_preset("ct"), cache="none")
    """
    if not os.fspath(preprocessed_dir).strip():
        raise ValueError("preprocessed_dir is empty; pass the folder written by python -m monai_mae.data.preprocess.")
    manifest = check_manifest(read_manifest(preprocessed_dir), preset)
    counts = {split: len(manifest["splits"].get(split) or []) for split in ("training", "validation")}
    empty = [split for split, count in counts.items() if count == 0]
    if empty:
        raise ValueError(
            f"{preprocessed_dir}: no volumes in the {' and '.join(repr(s) for s in empty)} split; training reads "
            f"'training' and validates on 'validation' (volumes per split: {counts})."
        )
    if with_label:
        unlabelled = [v["name"] for v in manifest["volumes"] if "label" not in v["files"]]
        if unlabelled:
            raise ValueError(
                f"{preprocessed_dir}: {len(unlabelled)} volume(s) have no label (e.g. {unlabelled[:5]}); fine-tuning "
                "needs labels: preprocess a datalist with labels (without --no-labels)."
            )
    if log:
        settings = manifest["preset"]["settings"]
        logger.info(
            f"preprocessed_dir={os.fspath(preprocessed_dir)!r}: training and validation read its .npy volumes "
            f"({counts['training']} training, {counts['validation']} validation; modality {settings['modality']}, "
            f"pixdim {settings['pixdim']}, intensity {settings['intensity']}); cache={cache!r} is ignored and "
            "dataset_dir is not read."
        )
    return manifest


def refuse_preprocessed_dir(preprocessed_dir: Any, config: str) -> None:
    """Stop a config that reads NIfTI volumes only (e.g. ``mae_finetune``'s ``evaluate.json``) when ``preprocessed_dir`` is set.

    Raises:
        ValueError: naming the config and the folder, so that a half-switched run (datalist from
            ``dataset_dir``, volumes from the folder) never starts.
    """
    if preprocessed_dir:
        raise ValueError(
            f"{config} scores the NIfTI volumes of dataset_dir in their original space and does not read "
            f"preprocessed_dir={str(preprocessed_dir)!r}; leave preprocessed_dir unset for it."
        )


class PreprocessedCentreCropDataset(PreprocessedCropDataset):
    """The centre crop of each volume (padded to the crop size first), as the NIfTI validation chain cuts it.

    :class:`~monai_mae.data.PreprocessedCropDataset` with one fixed position per volume: the start
    ``P // 2 - r // 2`` on each axis of the volume zero-padded (centred) to ``P = max(size, r)``,
    which is where MONAI's ``SpatialPadd`` + ``CenterSpatialCropd`` cut; in 2D the centre slice
    across ``slice_axis``. Items are lists of ``num_samples`` (default 1) identical crops, the
    training dataset's layout, so the same collate works. ``transform`` still applies.

    Args:
        out_dir, split, roi_size, spatial_dims, transform, slice_axis, preset: as in
            :class:`~monai_mae.data.PreprocessedCropDataset`; ``split`` defaults to ``"validation"``.
        num_samples: copies per item. Defaults to 1.
        with_label: also return the label crop. Defaults to False.

    Examples::

        val_ds = PreprocessedCentreCropDataset("/data/pre/ct", roi_size=(96, 96, 96), preset=load_data_preset("ct"))
        val_ds[0][0]["image"].shape  # torch.Size([1, 96, 96, 96])
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        split: str = "validation",
        roi_size: Sequence[int] | int = (96, 96, 96),
        num_samples: int = 1,
        with_label: bool = False,
        spatial_dims: int = 3,
        transform: Any = None,
        *,
        slice_axis: int = -1,
        preset: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            out_dir, split, roi_size, num_samples, with_label, spatial_dims, transform, seed=0,
            slice_axis=slice_axis, preset=preset,
        )  # fmt: skip
        if spatial_dims == 3:
            self._extent: tuple[int, ...] = tuple(self.roi_size)
        else:
            in_plane = iter(self.roi_size)
            self._extent = tuple(1 if axis == self.slice_axis else next(in_plane) for axis in range(3))

    def crop_starts(self, index: int, rng: np.random.Generator | None = None) -> list[tuple[int, int, int]]:
        """``num_samples`` copies of the centre start of volume ``index`` (padded coordinates); ``rng`` is unused."""
        shape = self.volumes[index]["shape"][1:]
        start = tuple(max(s, r) // 2 - r // 2 for s, r in zip(shape, self._extent))
        return [start] * self.num_samples  # type: ignore[list-item]


class PreprocessedVolumeDataset(torch.utils.data.Dataset):
    """Whole preprocessed volumes of one split, for sliding-window validation.

    Item ``i`` is ``{"image": MetaTensor (C, X, Y, Z) float32}`` plus ``"label"`` (1, X, Y, Z),
    integer-valued float32, with ``with_label``: the volume after the deterministic chain (RAS,
    spacing, intensity, foreground crop with the preprocessing margin), which is what the NIfTI
    validation chain gives except for the foreground crop. The meta data carry the stored affine and
    ``filename_or_obj`` (the source image), so handlers that name cases keep working.

    Args:
        out_dir: folder written by :func:`~monai_mae.data.preprocess_dataset`.
        split: a split of the manifest. Defaults to ``"validation"``.
        with_label: also return the label (every volume of the split must have one). Defaults to False.
        preset: keyword-only. The run's data preset, checked with :func:`~monai_mae.data.check_manifest`.
            Defaults to None (no check).

    Raises:
        FileNotFoundError / ValueError: from :func:`~monai_mae.data.read_manifest` and
            :func:`~monai_mae.data.check_manifest`; an empty ``split`` (lists those present);
            ``with_label`` when a volume has no label (named).

    Examples::

        val_ds = PreprocessedVolumeDataset("/data/pre/ct", with_label=True, preset=load_data_preset("ct"))
        item = val_ds[0]  # {"image": (1, X, Y, Z), "label": (1, X, Y, Z)}
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        split: str = "validation",
        with_label: bool = False,
        *,
        preset: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        manifest = read_manifest(self.out_dir)
        if preset is not None:
            check_manifest(manifest, preset)
        names = manifest["splits"].get(split) or []
        if not names:
            present = {s: len(n) for s, n in manifest["splits"].items()}
            raise ValueError(f"{self.out_dir}: no volumes in split {split!r}; volumes per split: {present}.")
        by_name = {entry["name"]: entry for entry in manifest["volumes"]}
        self.volumes: list[dict[str, Any]] = [by_name[name] for name in names]
        if with_label:
            unlabelled = [entry["name"] for entry in self.volumes if "label" not in entry["files"]]
            if unlabelled:
                raise ValueError(
                    f"{self.out_dir}: with_label=True but {len(unlabelled)} volume(s) of {split!r} have no label, "
                    f"e.g. {unlabelled[:5]}."
                )
        self.split = split
        self.with_label = bool(with_label)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, MetaTensor]:
        entry = self.volumes[index]
        source = entry["source"]["image"]
        meta = {
            "filename_or_obj": source if isinstance(source, str) else source[0],
            "preprocessed": str(self.out_dir / entry["files"]["image"]),
            "spacing": np.asarray(entry["spacing"], dtype=float),
        }
        affine = torch.as_tensor(entry["affine"], dtype=torch.float64)
        item = {}
        for key in ("image", "label") if self.with_label else ("image",):
            array = np.load(self.out_dir / entry["files"][key], allow_pickle=False)
            item[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), affine=affine.clone(), meta=dict(meta))
        return item
