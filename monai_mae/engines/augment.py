"""Random flips and intensity jitter of training crops, on the CPU (dataset transforms) or on the GPU (a batch hook).

The bundles' ``preprocessed_dir`` path reads crops with
:class:`~monai_mae.data.PreprocessedCropDataset`; the same augmentation then runs either per crop in
the DataLoader workers (:func:`crop_augmentation`, MONAI dictionary transforms) or per batch on the
device after the non-blocking copy (:class:`GPUAugmentPrepareBatch` around the trainer's
``prepare_batch``, calling :func:`~monai_mae.data.gpu_augment`), so MONAI's ``SupervisedTrainer``
stays unchanged. On the device path the workers can hand over crops in their storage layout
(float16, spatial axes reversed: ``PreprocessedCropDataset(storage_layout=True)``), which the hook
turns into MONAI's float32 layout on the device (``storage_layout=True``) before augmenting. Both
draw, per sample, a flip along each spatial axis with ``flip_prob`` (the label flipped with its
image), then ``image * (1 + s) + o`` with ``s ~ U(-intensity_scale, intensity_scale)``
and ``o ~ U(-intensity_shift, intensity_shift)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import CommonKeys

from monai_mae.data.augment import check_augment_options, crop_augmentation, gpu_augment
from monai_mae.data.crops import from_storage_layout
from monai_mae.engines.prepare_batch import as_plain_tensor, plain_prepare_batch

__all__ = ["GPUAugmentPrepareBatch", "crop_augmentation"]


class GPUAugmentPrepareBatch(PrepareBatch):
    """A ``prepare_batch`` that copies the batch to the device, augments it there, then calls the wrapped one.

    The image (and label) tensors of a dictionary batch go to ``device`` as plain tensors (without MONAI's
    metadata) with the trainer's ``non_blocking`` flag, :func:`~monai_mae.data.gpu_augment` flips and jitters
    them per sample on that device, and the wrapped ``prepare_batch`` (e.g.
    :class:`~monai_mae.engines.MAEPrepareBatch`, or :func:`~monai_mae.engines.prepare_batch.plain_prepare_batch`
    for supervised training) builds the network's inputs from the augmented batch; its own copy to the device
    is then a no-op. Shapes and dtypes are unchanged,
    except with ``storage_layout=True``: the batch comes from
    ``PreprocessedCropDataset(storage_layout=True)`` ((B, C, Z, Y, X) in the file's dtypes) and
    :func:`~monai_mae.data.from_storage_layout` turns image and label into float32 (B, C, X, Y, Z)
    on the device, right after the copy, so the wrapped hook sees what the default crops give.

    Args:
        prepare_batch: the hook to wrap, called as ``prepare_batch(batch, device, non_blocking, **kwargs)``.
            Defaults to None, :func:`~monai_mae.engines.prepare_batch.plain_prepare_batch` (``(image, label)``).
        flip_prob: probability of a flip along each spatial axis, in [0, 1]. Defaults to 0.1.
        intensity_shift: largest offset added to the image, >= 0. Defaults to 0.0.
        intensity_scale: largest relative change of the image's scale, in [0, 1). Defaults to 0.0.
        generator: torch generator for reproducible draws (on any device). Defaults to None, the
            default generator of the batch's device (seeded by ``monai.utils.set_determinism``).
        image_key: keyword-only. Defaults to ``"image"``.
        label_key: keyword-only; flipped with the image when the batch has it. Defaults to ``"label"``.
        storage_layout: keyword-only. Convert the copied batch from the storage layout first.
            Defaults to False.

    Raises:
        TypeError: when ``prepare_batch`` is not callable, or at call time for a batch that is not a dict.
        ValueError: for an option out of range (and the errors of ``gpu_augment`` for a bad batch).

    Examples::

        >>> from monai_mae.engines import MAEPrepareBatch
        >>> hook = GPUAugmentPrepareBatch(MAEPrepareBatch(), flip_prob=1.0)
        >>> images, targets, args, kwargs = hook({"image": torch.arange(8.0).reshape(1, 1, 2, 2, 2)}, "cpu")
        >>> images.shape, images.flatten().tolist() == list(range(7, -1, -1)), images is targets
        (torch.Size([1, 1, 2, 2, 2]), True, True)

    In a bundle (``train.json``)::

        "prepare_batch": {"_target_": "monai_mae.engines.GPUAugmentPrepareBatch",
                          "prepare_batch": {"_target_": "monai_mae.engines.MAEPrepareBatch"}, "flip_prob": 0.1}
    """

    def __init__(
        self,
        prepare_batch: Callable[..., Any] | None = None,
        flip_prob: float = 0.1,
        intensity_shift: float = 0.0,
        intensity_scale: float = 0.0,
        generator: torch.Generator | None = None,
        *,
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        storage_layout: bool = False,
    ) -> None:
        if prepare_batch is not None and not callable(prepare_batch):
            raise TypeError(f"prepare_batch must be callable or None, got {type(prepare_batch).__name__}.")
        check_augment_options(flip_prob, intensity_shift, intensity_scale)
        self.prepare_batch = prepare_batch if prepare_batch is not None else plain_prepare_batch
        self.flip_prob = float(flip_prob)
        self.intensity_shift = float(intensity_shift)
        self.intensity_scale = float(intensity_scale)
        self.generator = generator
        self.image_key = image_key
        self.label_key = label_key
        self.storage_layout = bool(storage_layout)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``batchdata``: dict with ``image`` (B, C, *S) and optionally ``label`` (B, C', *S); returns what the wrapped hook returns."""
        if not isinstance(batchdata, Mapping):
            raise TypeError(
                f"GPUAugmentPrepareBatch needs a dict batch with {self.image_key!r} (and {self.label_key!r}), "
                f"got {type(batchdata).__name__}."
            )
        batch = dict(batchdata)
        for key in (self.image_key, self.label_key):
            if isinstance(batch.get(key), torch.Tensor):
                batch[key] = as_plain_tensor(batch[key]).to(device=device, non_blocking=non_blocking, **kwargs)
        if self.storage_layout:  # (B, C, Z, Y, X) float16/uint8 -> (B, C, X, Y, Z) float32, on the device
            batch = from_storage_layout(batch, (self.image_key, self.label_key))
        batch = gpu_augment(
            batch,
            flip_prob=self.flip_prob,
            intensity_shift=self.intensity_shift,
            intensity_scale=self.intensity_scale,
            generator=self.generator,
            image_key=self.image_key,
            label_key=self.label_key,
        )
        return self.prepare_batch(batch, device, non_blocking, **kwargs)
