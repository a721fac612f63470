"""CT and MRI preprocessing presets for MAE pretraining and fine-tuning, built from MONAI transforms.

One factory, :func:`get_pretrain_transforms`, serves 3D crops and 2D slices, training and
validation, images only (pretraining) and image + label (fine-tuning). The data presets, shipped
inside the package as ``monai_mae/data/presets/<modality>.json``, are plain dicts of its keyword
arguments, read with :func:`load_data_preset`; :func:`get_dataset` picks MONAI's plain, cached or
persistent dataset.
"""

from __future__ import annotations

import importlib.resources
import inspect
import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    EnsureTyped,
    Identityd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)
from monai.utils import ensure_tuple_rep, look_up_option

from monai_mae.data.augment import augment_transforms, check_augment_options
from monai_mae.utils import read_json

__all__ = [
    "CACHE_MODES",
    "MODALITIES",
    "ReplaceNonFinited",
    "data_preset_names",
    "get_dataset",
    "get_pretrain_transforms",
    "intensity_transform",
    "load_data_preset",
    "transform_hash",
]

logger = logging.getLogger(__name__)

#: Supported values of ``modality``.
MODALITIES = ("ct", "mri")
#: Supported values of ``cache`` in :func:`get_dataset`.
CACHE_MODES = ("none", "cache", "persistent")
_LABEL_KEY = "label"
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # explicit: MONAI deprecates the implicit default
#: The packaged data presets, read through ``importlib.resources`` so that a wheel install finds them.
_PRESETS = importlib.resources.files("monai_mae.data") / "presets"


def _normalise_roi(roi_size: Sequence[int] | int, spatial_dims: int) -> tuple[int, ...]:
    """Check ``spatial_dims`` and return ``roi_size`` as ``spatial_dims`` positive ints."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if isinstance(roi_size, (int, np.integer)):
        roi = tuple(int(s) for s in ensure_tuple_rep(int(roi_size), spatial_dims))
    else:
        roi = tuple(int(s) for s in roi_size)
        if len(roi) != spatial_dims:
            raise ValueError(
                f"roi_size {roi} has {len(roi)} entries but spatial_dims={spatial_dims}; "
                f"expected {spatial_dims} sizes (or one int)."
            )
    if any(s < 1 for s in roi):
        raise ValueError(f"roi_size must be positive, got {roi_size!r}.")
    return roi


class ReplaceNonFinited(MapTransform):
    """Replace NaN and +/-Inf voxels by ``value``, logging a warning that names the file.

    Put it right after ``LoadImaged`` (before resampling spreads a NaN over its neighbours). The
    warning quotes ``meta["filename_or_obj"]`` of a ``MetaTensor`` (else the key) and the count.
    Finite data passes through unchanged (the same object).

    Args:
        keys: keys of the images to clean.
        value: the replacement, e.g. the CT window minimum ``a_min`` (HU) or 0 for MRI. Defaults to 0.
        allow_missing_keys: don't raise for a missing key. Defaults to False.

    Raises:
        ValueError: when ``value`` is not finite.

    Examples::

        >>> clean = ReplaceNonFinited("image", value=-175.0)
        >>> clean({"image": torch.tensor([1.0, float("nan"), -float("inf")])})["image"]
        tensor([   1., -175., -175.])

    In a chain, right after loading::

        t = Compose([LoadImaged("image", ensure_channel_first=True), ReplaceNonFinited("image", value=-175.0)])
    """

    def __init__(self, keys: KeysCollection, value: float = 0.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not np.isfinite(value):
            raise ValueError(f"value must be finite, got {value!r}.")
        self.value = float(value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            bad = ~torch.isfinite(img) if isinstance(img, torch.Tensor) else ~np.isfinite(img)
            count = int(bad.sum())
            if count == 0:
                continue
            source = img.meta.get("filename_or_obj", key) if isinstance(img, MetaTensor) else key
            total = bad.numel() if isinstance(bad, torch.Tensor) else bad.size
            logger.warning(f"{source}: {count} NaN/Inf voxel(s) of {total} in {key!r} replaced by {self.value:g}.")
            d[key] = (
                img.masked_fill(bad, self.value) if isinstance(img, torch.Tensor) else np.where(bad, self.value, img)
            )
        return d


def get_pretrain_transforms(
    modality: str = "ct",
    roi_size: Sequence[int] | int = (96, 96, 96),
    spatial_dims: int = 3,
    pixdim: Sequence[float] | float | None = (1.5, 1.5, 2.0),
    a_min: float = -175.0,
    a_max: float = 250.0,
    num_samples: int = 2,
    train: bool = True,
    keys: Sequence[str] = ("image",),
    with_label: bool = False,
    flip_prob: float = 0.1,
    replace_nonfinite: bool = True,
    intensity_shift: float = 0.0,
    intensity_scale: float = 0.0,
) -> Compose:
    """Preprocessing and augmentation for MAE pretraining (and UNETR fine-tuning) of CT or MRI.

    Volumes are always read as 3D. The chain, all MONAI dictionary transforms:

    1. ``LoadImaged`` (channel first; a 4D file's 4th axis becomes the channels, so a singleton
       4th axis gives one channel) -> :class:`ReplaceNonFinited` (NaN/Inf image voxels -> ``a_min``
       for CT, the bottom of the window; 0 for MRI, i.e. background; a warning names the file)
       -> ``Orientationd("RAS")`` -> ``Spacingd(pixdim)`` (bilinear for images, nearest for the label).
    2. Intensity and foreground: ``ct``: ``ScaleIntensityRanged(a_min, a_max -> 0, 1, clip)``
       then ``CropForegroundd`` on image > 0 (above ``a_min``); ``mri``: ``CropForegroundd`` on
       the raw image > 0, then ``NormalizeIntensityd(nonzero, channel_wise)`` (cropping first,
       because normalised tissue below the mean is negative and would be cut away).
    3. ``SpatialPadd`` to the crop size, so a volume smaller than ``roi_size`` is padded, not an error.
    4. Crops. Train: ``RandSpatialCropSamplesd`` (``num_samples`` crops of fixed size), or with
       ``with_label`` ``RandCropByPosNegLabeld`` (half the crops centred on organs), then
       ``RandFlipd`` on each spatial axis with ``flip_prob``, then the optional intensity jitter
       of the image, per crop: ``RandScaleIntensityd(factors=intensity_scale)`` and
       ``RandShiftIntensityd(offsets=intensity_shift)`` (the fine-tuning recipe of the
       ``mae_finetune`` bundle; these three steps are :func:`~monai_mae.data.augment.augment_transforms`).
       Validation: ``CenterSpatialCropd``.
    5. 2D (``spatial_dims=2``): crops are ``(roi_h, roi_w, 1)`` axial slabs, squeezed with
       ``SqueezeDimd(dim=-1)`` so batches are (B, C, H, W); validation takes the centre slice.
    6. ``EnsureTyped``.

    Outputs per item: train, a list of ``num_samples`` dicts with ``image`` ``(C, *roi_size)``
    (and ``label`` ``(1, *roi_size)``, integer-valued floats); validation, one such dict.

    Args:
        modality: ``"ct"`` or ``"mri"``. Defaults to ``"ct"``.
        roi_size: crop size, ``spatial_dims`` ints or one int for all axes. Defaults to ``(96, 96, 96)``.
        spatial_dims: 3 for volume crops, 2 for axial slices. Defaults to 3.
        pixdim: target voxel size in mm (x, y, z), or None to keep the native spacing.
            Defaults to ``(1.5, 1.5, 2.0)``.
        a_min: CT window lower bound in HU (maps to 0; ignored for MRI). Defaults to -175.0.
        a_max: CT window upper bound in HU (maps to 1; ignored for MRI). Defaults to 250.0.
        num_samples: random crops per volume when training. Defaults to 2.
        train: random crops and flips if True, a deterministic centre crop if False. Defaults to True.
        keys: image keys of the data dicts (several keys = several co-registered images).
            Defaults to ``("image",)``.
        with_label: also load ``"label"``, resample it with nearest and crop it identically.
            Defaults to False.
        flip_prob: probability of flipping along each spatial axis when training. Defaults to 0.1.
        replace_nonfinite: replace NaN/Inf image voxels as in step 1; False leaves them (a NaN then
            reaches the loss, where :class:`~monai_mae.engines.NonFiniteLossGuard` stops training).
            Defaults to True.
        intensity_shift: when training, add ``U(-intensity_shift, intensity_shift)`` to each crop's
            image (in the units after step 2: the [0, 1] window for CT, standard deviations for MRI).
            Defaults to 0 (off).
        intensity_scale: when training, multiply each crop's image by ``1 + U(-intensity_scale,
            intensity_scale)``, before the shift; in [0, 1). Defaults to 0 (off).

    Returns:
        A ``monai.transforms.Compose``. A constant ("empty") volume yields constant crops; the
        masked loss on them is finite (also with ``norm_pix_loss``).

    Raises:
        ValueError: for an unknown ``modality`` (lists the choices), ``spatial_dims`` not 2 or 3,
            a ``roi_size`` whose length is not ``spatial_dims``, ``a_min >= a_max`` for CT,
            ``num_samples < 1``, ``flip_prob`` outside [0, 1], an ``intensity_shift`` that is
            negative or not finite, ``intensity_scale`` outside [0, 1), empty ``keys`` or ``"label"`` in ``keys``.

    Examples::

        >>> import tempfile
        >>> from monai_mae.data.synthetic import write_synthetic_dataset
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = write_synthetic_dataset(folder, num=1, num_validation=0, shape=(32, 32, 24))
        ...     volume = {"image": f"{folder}/imagesTr/phantom_000.nii.gz"}
        ...     # 3D CT pretraining: two 16^3 crops per volume, intensities windowed to [0, 1]
        ...     crops = get_pretrain_transforms("ct", roi_size=(16, 16, 16), num_samples=2)(volume)
        ...     # 2D slices for validation (MRI normalisation, no resampling)
        ...     middle = get_pretrain_transforms("mri", roi_size=(16, 16), spatial_dims=2, pixdim=None, train=False)(volume)
        >>> [crop["image"].shape for crop in crops], middle["image"].shape
        ([torch.Size([1, 16, 16, 16]), torch.Size([1, 16, 16, 16])], torch.Size([1, 16, 16]))
        >>> 0.0 <= float(crops[0]["image"].min()) <= float(crops[0]["image"].max()) <= 1.0
        True

    Full size, e.g. 96^3 CT crops::

        t = get_pretrain_transforms("ct", roi_size=(96, 96, 96), num_samples=2)
        [s["image"].shape for s in t({"image": "ct.nii.gz"})]  # [torch.Size([1, 96, 96, 96])] * 2
    """
    try:
        modality = look_up_option(modality.lower() if isinstance(modality, str) else modality, MODALITIES)
    except ValueError as err:
        raise ValueError(f"modality={modality!r} is not supported: {err}") from err
    roi = _normalise_roi(roi_size, spatial_dims)
    if modality == "ct" and not float(a_min) < float(a_max):
        raise ValueError(f"a_min ({a_min}) must be below a_max ({a_max}) for the CT window.")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}.")
    check_augment_options(flip_prob, intensity_shift, intensity_scale)
    image_keys = tuple(keys) if not isinstance(keys, str) else (keys,)
    if not image_keys:
        raise ValueError("keys must name at least one image key, got an empty sequence.")
    if _LABEL_KEY in image_keys:
        raise ValueError(f"keys={image_keys} contains {_LABEL_KEY!r}; pass with_label=True to load the label.")
    all_keys = image_keys + ((_LABEL_KEY,) if with_label else ())
    crop = roi if spatial_dims == 3 else (*roi, 1)  # 2D: (h, w, 1) slabs of the 3D volume

    xforms: list[MapTransform] = [
        LoadImaged(keys=all_keys, ensure_channel_first=True, image_only=True),
    ]
    if replace_nonfinite:
        xforms.append(ReplaceNonFinited(keys=image_keys, value=float(a_min) if modality == "ct" else 0.0))
    xforms.append(Orientationd(keys=all_keys, axcodes="RAS", labels=_RAS_LABELS))
    if pixdim is not None:
        modes = ("bilinear",) * len(image_keys) + (("nearest",) if with_label else ())
        xforms.append(Spacingd(keys=all_keys, pixdim=pixdim, mode=modes))
    foreground = CropForegroundd(keys=all_keys, source_key=image_keys[0], allow_smaller=True)
    if modality == "ct":
        xforms += [ScaleIntensityRanged(keys=image_keys, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)]
        xforms += [foreground]
    else:
        xforms += [foreground, NormalizeIntensityd(keys=image_keys, nonzero=True, channel_wise=True)]
    xforms.append(SpatialPadd(keys=all_keys, spatial_size=crop))

    if train:
        if with_label:
            xforms.append(
                RandCropByPosNegLabeld(
                    keys=all_keys,
                    label_key=_LABEL_KEY,
                    spatial_size=crop,
                    pos=1.0,
                    neg=1.0,
                    num_samples=num_samples,
                    image_key=image_keys[0],
                    image_threshold=0.0,
                )
            )
        else:
            xforms.append(
                RandSpatialCropSamplesd(keys=all_keys, roi_size=crop, num_samples=num_samples, random_size=False)
            )
    else:
        xforms.append(CenterSpatialCropd(keys=all_keys, roi_size=crop))
    if spatial_dims == 2:
        xforms.append(SqueezeDimd(keys=all_keys, dim=-1))
    if train:
        xforms += augment_transforms(all_keys, image_keys, spatial_dims, flip_prob, intensity_shift, intensity_scale)
    xforms.append(EnsureTyped(keys=all_keys))
    return Compose(xforms)


def intensity_transform(
    preset: Mapping[str, Any], keys: KeysCollection = "image", invert: bool = False
) -> MapTransform:
    """The intensity step of a data preset, for the evaluation and inference chains of the bundles.

    ``ct``: the window ``[a_min, a_max]`` scaled to ``[0, 1]`` and clipped (with ``invert``: ``[0, 1]`` back to
    HU, unclipped, for reconstructions). ``mri``: ``NormalizeIntensityd(nonzero, channel_wise)`` (with
    ``invert``: unchanged, there is no window to return to).

    Args:
        preset: a data preset (:func:`load_data_preset` or a model file's), with ``modality`` and, for CT,
            ``a_min`` and ``a_max``.
        keys: the keys to transform. Defaults to ``"image"``.
        invert: the reverse mapping, for a network's output. Defaults to False.

    Raises:
        ValueError: for a modality other than ``ct`` or ``mri``.

    Examples::

        >>> window = intensity_transform({"modality": "ct", "a_min": -175.0, "a_max": 250.0})
        >>> float(window({"image": np.array([37.5])})["image"][0])
        0.5
    """
    modality = look_up_option(preset.get("modality"), MODALITIES)
    if modality == "ct":
        window = {"a_min": preset["a_min"], "a_max": preset["a_max"], "b_min": 0.0, "b_max": 1.0}
        if invert:  # [0, 1] back to the window
            window = {"a_min": 0.0, "a_max": 1.0, "b_min": window["a_min"], "b_max": window["a_max"]}
        return ScaleIntensityRanged(keys=keys, **window, clip=not invert)
    return Identityd(keys=keys) if invert else NormalizeIntensityd(keys=keys, nonzero=True, channel_wise=True)


def get_dataset(
    data: Sequence[dict],
    transform: Callable | Sequence[Callable],
    cache: str = "none",
    cache_dir: str | os.PathLike[str] | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
) -> Dataset:
    """Wrap a datalist in MONAI's plain, in-memory cached or on-disk cached dataset.

    The cached variants store the output of the transforms up to the first random one
    (load, orient, resample, intensity, crop-foreground, pad), so random crops stay random.
    ``"persistent"`` keeps MONAI's default ``track_meta=False``: its items are plain tensors
    without the affine (reading ``MetaTensor`` back would need unsafe ``weights_only=False``).
    Its cache file names hash the settings of those deterministic transforms as well as the item
    (:func:`transform_hash`), so a run with another spacing, window or crop size in the same
    ``cache_dir`` preprocesses again instead of reading items cached under the old settings.

    Args:
        data: datalist entries, e.g. from :func:`monai_mae.data.load_datalist`.
        transform: transforms, e.g. from :func:`get_pretrain_transforms`.
        cache: ``"none"`` -> ``Dataset``, ``"cache"`` -> ``CacheDataset`` (in memory),
            ``"persistent"`` -> ``PersistentDataset`` (on disk in ``cache_dir``). Defaults to ``"none"``.
        cache_dir: folder for ``"persistent"`` (created if needed); required there. Defaults to None.
        cache_rate: fraction of items cached by ``"cache"``. Defaults to 1.0.
        num_workers: threads filling the ``"cache"`` cache at construction (0 -> 1 thread);
            unrelated to the DataLoader's workers. Defaults to 0.

    Returns:
        A ``monai.data.Dataset`` (or its ``CacheDataset`` / ``PersistentDataset`` subclass).

    Raises:
        ValueError: for an unknown ``cache`` (lists the choices), ``"persistent"`` without
            ``cache_dir``, or ``cache_rate`` outside (0, 1].

    Examples::

        items = load_datalist("./data/synthetic")
        ds = get_dataset(items, get_pretrain_transforms("ct"), cache="persistent", cache_dir="./cache")
    """
    try:
        mode = look_up_option(cache, CACHE_MODES)
    except ValueError as err:
        raise ValueError(f"cache={cache!r} is not supported: {err}") from err
    if mode == "none":
        return Dataset(data=data, transform=transform)
    if mode == "cache":
        if not 0.0 < float(cache_rate) <= 1.0:
            raise ValueError(f"cache_rate must be in (0, 1], got {cache_rate!r}.")
        return CacheDataset(data=data, transform=transform, cache_rate=cache_rate, num_workers=num_workers)
    if cache_dir is None:
        raise ValueError("cache='persistent' needs cache_dir (a folder for the cached items), got None.")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return PersistentDataset(data=data, transform=transform, cache_dir=cache_dir, hash_transform=transform_hash)


def transform_hash(transforms: Sequence[Callable]) -> bytes:
    """Hash of a list of transforms and their settings, for ``PersistentDataset(hash_transform=...)``.

    MONAI passes the deterministic transforms before the first random one. They are hashed with
    MONAI's ``pickle_hashing``, so any setting (spacing, intensity window, crop size) changes the
    hash; transforms that cannot be pickled (e.g. a lambda) fall back to a hash of the class names,
    with a warning that changed settings then go unnoticed.

    Args:
        transforms: the transforms to hash.

    Returns:
        A hex digest as bytes (what MONAI expects from a hash function).
    """
    try:
        return pickle_hashing(list(transforms))
    except Exception as err:  # noqa: BLE001 - any pickling failure: lambdas, local classes, open handles
        names = ",".join(type(t).__qualname__ for t in transforms)
        logger.warning(
            f"PersistentDataset cache: the transforms cannot be pickled ({type(err).__name__}: {err}); the cache key "
            f"uses their class names only ({names}), so clear cache_dir after changing their settings."
        )
        return pickle_hashing(names)


def data_preset_names() -> list[str]:
    """Names of the data presets shipped inside the package (``monai_mae/data/presets/<name>.json``)."""
    return sorted(entry.name[: -len(".json")] for entry in _PRESETS.iterdir() if entry.name.endswith(".json"))


def _read_preset(name_or_path: str | os.PathLike[str]) -> tuple[str, Any]:
    """Return ``(source, parsed JSON)`` of a packaged preset name (``ct``, ``data_ct``) or of a file path."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if path.suffix == ".json" or os.sep in text or (os.altsep is not None and os.altsep in text) or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"data preset file {path} not found.")
        return str(path), read_json(path)
    name = text[len("data_") :] if text.startswith("data_") else text
    if name not in data_preset_names():
        raise ValueError(
            f"unknown data preset {text!r}; available presets: {data_preset_names()} "
            "(also as data_<name>), or pass a path to a JSON file."
        )
    source = f"monai_mae/data/presets/{name}.json"
    return source, read_json(_PRESETS / f"{name}.json", name=source)


def load_data_preset(name_or_path: str | os.PathLike[str], **overrides: Any) -> dict[str, Any]:
    """Read a data preset: a JSON dict of keyword arguments of :func:`get_pretrain_transforms`.

    A name is one of the presets shipped inside the package, ``monai_mae/data/presets/<name>.json``
    (``"ct"`` and ``"data_ct"`` both name ``ct.json``), so a wheel install has them too. Anything
    ending in ``.json`` or containing a path separator is read as a path: the repository's
    ``configs/data_ct.json`` and ``configs/data_mri.json`` are copies of the packaged presets to
    edit and pass by path.

    Args:
        name_or_path: preset name (``"ct"``, ``"mri"``, ``"data_ct"``) or path to a JSON file.
        overrides: keyword arguments replacing or adding preset entries (e.g. ``roi_size``,
            ``spatial_dims``, ``train``), checked like the file's keys.

    Returns:
        The keyword arguments as a dict (JSON lists stay lists).

    Raises:
        FileNotFoundError: when a path is given and does not exist.
        ValueError: for an unknown name (lists the available presets), malformed JSON (file,
            line and column), a JSON value that is not an object, or keys that
            :func:`get_pretrain_transforms` does not take (lists the accepted ones).

    Examples::

        >>> kwargs = load_data_preset("ct", roi_size=(64, 64, 64))
        >>> kwargs["a_min"], kwargs["a_max"]
        (-175.0, 250.0)
        >>> train_transforms = get_pretrain_transforms(**kwargs, train=True)
    """
    path, preset = _read_preset(name_or_path)
    if not isinstance(preset, dict):
        raise ValueError(
            f"{path}: a data preset must be a JSON object of keyword arguments, got {type(preset).__name__}."
        )
    accepted = set(inspect.signature(get_pretrain_transforms).parameters)
    for source, entries in ((path, preset), ("overrides", overrides)):
        unknown = sorted(set(entries) - accepted)
        if unknown:
            raise ValueError(
                f"{source}: unknown keys {unknown} for get_pretrain_transforms; accepted: {sorted(accepted)}."
            )
    return {**preset, **overrides}
