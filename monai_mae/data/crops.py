"""Datasets over a preprocessed folder: random crops for training, centre crops and whole volumes for validation.

A folder written by :func:`~monai_mae.data.preprocess.preprocess_dataset` holds one ``.npy`` file per
volume (Fortran order, (C, X, Y, Z)); these datasets read it through memory maps, so a crop costs the
bytes of its rows, not the volume:

* :class:`PreprocessedCropDataset`: ``num_samples`` random crops per volume (or 2D slices), laid out
  like MONAI's ``RandSpatialCropSamplesd`` output, so the bundles' collate and
  :class:`~monai_mae.engines.MAEPrepareBatch` work unchanged; optionally in the file's storage
  layout, which :func:`from_storage_layout` turns back into MONAI's layout on the batch's device;
* :class:`PreprocessedCentreCropDataset`: the centre crop of each volume (pretraining validation, as
  the NIfTI chain's ``CenterSpatialCropd``);
* :class:`PreprocessedVolumeDataset`: whole volumes (fine-tuning validation with a sliding window).

Each checks the folder's manifest (:func:`~monai_mae.data.read_manifest`) and, given the run's data
preset, that the folder was made with it (:func:`~monai_mae.data.check_manifest`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Randomizable

from monai_mae.data.preprocess.manifest import check_manifest, read_manifest, split_volumes
from monai_mae.data.preprocess.settings import require_int

__all__ = [
    "PreprocessedCentreCropDataset",
    "PreprocessedCropDataset",
    "PreprocessedVolumeDataset",
    "from_storage_layout",
]


def _read_split(
    out_dir: Path, split: str, with_label: bool, preset: str | os.PathLike[str] | Mapping[str, Any] | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The folder's manifest (checked against ``preset`` when given) and the entries of ``split``."""
    manifest = read_manifest(out_dir)
    if preset is not None:
        check_manifest(manifest, preset)
    return manifest, split_volumes(manifest, split, out_dir, with_label=with_label)


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
        out_dir: folder written by :func:`~monai_mae.data.preprocess_dataset` (its manifest is read with
            :func:`~monai_mae.data.read_manifest`).
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
        preset: keyword-only. The run's data preset; when given, :func:`~monai_mae.data.check_manifest` stops a run
            whose preset differs from the folder's. Defaults to None.
        storage_layout: keyword-only. Return crops in the file's dtype and reversed spatial order
            (see above) instead of float32 ``(C, *roi_size)``. Defaults to False.

    Raises:
        FileNotFoundError / ValueError: from :func:`~monai_mae.data.read_manifest` and
            :func:`~monai_mae.data.check_manifest`; a ``split`` the manifest lacks (lists those present);
            a bad ``roi_size``, ``num_samples``,
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
        num_samples = require_int(num_samples, "num_samples", 1)
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
        self.manifest, self.volumes = _read_split(self.out_dir, split, with_label, preset)
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
        _, self.volumes = _read_split(self.out_dir, split, with_label, preset)
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
            data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            item[key] = MetaTensor(data, affine=affine.clone(), meta=dict(meta))
        return item
