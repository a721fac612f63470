"""Random flips and intensity jitter of training crops: one definition for the CPU and the device paths.

Every training path of the package augments the same way: per sample, a flip along each spatial axis
with probability ``flip_prob`` (the label flipped with its image), then ``image * (1 + s) + o`` with
``s ~ U(-intensity_scale, intensity_scale)`` and ``o ~ U(-intensity_shift, intensity_shift)``; labels
keep their values. This module holds both forms of it:

* :func:`augment_transforms`: the MONAI dictionary transforms (``RandFlipd``, ``RandScaleIntensityd``,
  ``RandShiftIntensityd``), per crop on the CPU. The NIfTI chain of
  :func:`~monai_mae.data.get_pretrain_transforms` ends with them, and :func:`crop_augmentation` wraps
  them for :class:`~monai_mae.data.PreprocessedCropDataset`'s ``transform``.
* :func:`gpu_augment`: the same draws as torch ops on a whole batch, on the batch's device (after the
  non-blocking copy; :class:`~monai_mae.engines.GPUAugmentPrepareBatch` calls it).

:func:`check_augment_options` is the one range check of the three options.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.transforms import Compose, MapTransform, RandFlipd, RandScaleIntensityd, RandShiftIntensityd
from monai.utils import CommonKeys

__all__ = ["augment_transforms", "check_augment_options", "crop_augmentation", "gpu_augment"]


def check_augment_options(flip_prob: float, intensity_shift: float, intensity_scale: float) -> None:
    """Raise ``ValueError`` naming the first augmentation option out of range.

    The ranges every augmentation of the package accepts (:func:`~monai_mae.data.get_pretrain_transforms`,
    :func:`gpu_augment`, :func:`crop_augmentation`): ``flip_prob`` in [0, 1], ``intensity_shift`` finite
    and >= 0, ``intensity_scale`` in [0, 1).

    Examples::

        >>> check_augment_options(0.1, 0.0, 1.0)
        Traceback (most recent call last):
        ...
        ValueError: intensity_scale must be in [0, 1), got 1.0.
    """
    if not 0.0 <= float(flip_prob) <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}.")
    if not (0.0 <= float(intensity_shift) and math.isfinite(float(intensity_shift))):
        raise ValueError(f"intensity_shift must be a finite number >= 0, got {intensity_shift!r}.")
    if not 0.0 <= float(intensity_scale) < 1.0:
        raise ValueError(f"intensity_scale must be in [0, 1), got {intensity_scale!r}.")


def augment_transforms(
    keys: Sequence[str],
    image_keys: Sequence[str],
    spatial_dims: int,
    flip_prob: float,
    intensity_shift: float = 0.0,
    intensity_scale: float = 0.0,
) -> list[MapTransform]:
    """The CPU form of the augmentation as a list of MONAI dictionary transforms (empty when every option is 0).

    ``RandFlipd`` of ``keys`` on each spatial axis with ``flip_prob`` (only when > 0), then
    ``RandScaleIntensityd`` and ``RandShiftIntensityd`` of ``image_keys`` with ``prob=1`` (each only
    when its range is > 0).

    Args:
        keys: the entries flipped together (images and label).
        image_keys: the entries whose intensities are jittered.
        spatial_dims: the number of spatial axes flipped, 2 or 3.
        flip_prob: probability of a flip along each spatial axis, in [0, 1].
        intensity_shift: largest offset added to the images, >= 0. Defaults to 0.0.
        intensity_scale: largest relative change of the images' scale, in [0, 1). Defaults to 0.0.

    Returns:
        The transforms, in the order they run.

    Raises:
        ValueError: for ``spatial_dims`` not 2 or 3 or an option out of range.

    Examples::

        >>> [type(t).__name__ for t in augment_transforms(["image", "label"], ["image"], 2, 0.1, 0.1)]
        ['RandFlipd', 'RandFlipd', 'RandShiftIntensityd']
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    check_augment_options(flip_prob, intensity_shift, intensity_scale)
    steps: list[MapTransform] = []
    if float(flip_prob) > 0:
        steps += [RandFlipd(keys=list(keys), prob=float(flip_prob), spatial_axis=axis) for axis in range(spatial_dims)]
    if float(intensity_scale) > 0:
        steps.append(RandScaleIntensityd(keys=list(image_keys), factors=float(intensity_scale), prob=1.0))
    if float(intensity_shift) > 0:
        steps.append(RandShiftIntensityd(keys=list(image_keys), offsets=float(intensity_shift), prob=1.0))
    return steps


def crop_augmentation(
    spatial_dims: int = 3,
    flip_prob: float = 0.1,
    intensity_shift: float = 0.0,
    intensity_scale: float = 0.0,
    with_label: bool = False,
) -> Compose | None:
    """The CPU form of the augmentation for one crop dict ``{"image"[, "label"]}``: :func:`augment_transforms`.

    Args:
        spatial_dims: 2 or 3 (axes flipped). Defaults to 3.
        flip_prob: probability of a flip along each spatial axis, in [0, 1]. Defaults to 0.1.
        intensity_shift: largest offset added to the image, >= 0. Defaults to 0.0.
        intensity_scale: largest relative change of the image's scale, in [0, 1). Defaults to 0.0.
        with_label: flip ``"label"`` with ``"image"``. Defaults to False.

    Returns:
        A ``Compose`` for :class:`~monai_mae.data.PreprocessedCropDataset`'s ``transform``, or None
        when every option is 0 (nothing to do).

    Raises:
        ValueError: for ``spatial_dims`` not 2 or 3 or an option out of range.

    Examples::

        >>> t = crop_augmentation(3, flip_prob=1.0, with_label=True)
        >>> crop = {"image": torch.arange(8.0).reshape(1, 2, 2, 2), "label": torch.arange(8.0).reshape(1, 2, 2, 2)}
        >>> out = t(crop)
        >>> out["image"].flatten().tolist() == out["label"].flatten().tolist() == list(range(7, -1, -1))
        True
        >>> crop_augmentation(2, flip_prob=0.0) is None
        True
    """
    keys = [CommonKeys.IMAGE, CommonKeys.LABEL] if with_label else [CommonKeys.IMAGE]
    steps = augment_transforms(keys, [CommonKeys.IMAGE], spatial_dims, flip_prob, intensity_shift, intensity_scale)
    return Compose(steps) if steps else None


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
