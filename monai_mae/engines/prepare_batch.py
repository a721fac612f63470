"""Batch hooks that hand the network plain tensors: ``MAEPrepareBatch`` (the hook that makes MONAI's stock
``SupervisedTrainer`` train an MAE) and ``plain_prepare_batch`` (MONAI's ``default_prepare_batch`` for
supervised training).

MONAI's loaders give ``MetaTensor``s; every operation on one goes through MONAI's Python wrapper
(``__torch_function__``), a cost paid per operation that weighs most on small networks
(``benchmarks/bench_bundle.py`` compares a loop on MetaTensors with one on plain tensors), and
``SupervisedTrainer(compile=True)`` re-wraps the network's output as a ``MetaTensor`` when its input was one,
which fails for an MAE's ``(pred, mask)`` tuple. Training needs no metadata, so these hooks drop it
(``as_tensor()``, no copy) before the copy to the device. Evaluators that invert or save their predictions keep
MONAI's default hook: their sliding-window inferer gives the network plain windows itself and puts the metadata
back on the stitched prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.utils import CommonKeys

from monai_mae.networks.masking import content_aware_weights

__all__ = ["MAEPrepareBatch", "as_plain_tensor", "plain_prepare_batch"]


def as_plain_tensor(value: Any) -> Any:
    """``value`` without MONAI's metadata: a ``MetaTensor`` becomes a plain ``torch.Tensor`` (same storage), a
    dict / list / tuple is converted item by item, anything else comes back unchanged."""
    if isinstance(value, MetaTensor):
        return value.as_tensor()
    if isinstance(value, Mapping):
        return {k: as_plain_tensor(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_plain_tensor(v) for v in value)
    return value


def plain_prepare_batch(
    batchdata: Mapping[str, Any] | torch.Tensor | Sequence[torch.Tensor],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    **kwargs: Any,
) -> Any:
    """MONAI's ``default_prepare_batch`` on plain tensors: ``(image, label)`` of a dict batch, on ``device``.

    Example:
        >>> from monai.data import MetaTensor
        >>> image, label = plain_prepare_batch({"image": MetaTensor(torch.ones(1, 1, 2, 2)), "label": torch.zeros(1)})
        >>> type(image).__name__, type(label).__name__
        ('Tensor', 'Tensor')
    """
    return default_prepare_batch(as_plain_tensor(batchdata), device, non_blocking, **kwargs)


class MAEPrepareBatch(PrepareBatch):
    """Inputs and target are the same image; masking options travel to the network as keyword arguments.

    Like MONAI's ``DiffusionPrepareBatch`` this builds its own target, so the stock
    ``SupervisedTrainer`` / ``SupervisedEvaluator`` and ``SimpleInferer`` run an MAE unchanged:
    the network is called as ``network(images, **kwargs)`` and the loss as ``loss((pred, mask), images)``.
    ``images`` is a plain tensor (a ``MetaTensor``'s metadata is dropped, see the module's notes).

    Args:
        image_key: key of the image in a dictionary batch. Defaults to ``"image"``.
        seed: if set, masks are drawn from a generator re-seeded with this value for every batch, so
            the same images always get the same masks (use it for a validation loss that is comparable
            across epochs). ``None`` (default) draws fresh masks.
        content_aware_strength: > 0 turns on content-aware masking (masks steered onto tissue, see
            :func:`~monai_mae.networks.masking.content_aware_weights`); needs ``patch_size``.
        patch_size: the network's patch size, for content-aware masking.
        foreground_threshold: intensity above which a voxel counts as tissue. Defaults to 0.05 (after a
            CT window scaled to [0, 1]).

    Raises:
        ValueError: content-aware masking without a patch size, or a negative strength.
    """

    def __init__(
        self,
        image_key: str = CommonKeys.IMAGE,
        seed: int | None = None,
        content_aware_strength: float = 0.0,
        patch_size: Sequence[int] | int | None = None,
        foreground_threshold: float = 0.05,
    ) -> None:
        if content_aware_strength < 0:
            raise ValueError(f"content_aware_strength must be >= 0, got {content_aware_strength}.")
        if content_aware_strength > 0 and patch_size is None:
            raise ValueError("content-aware masking (content_aware_strength > 0) needs the network's patch_size.")
        self.image_key = image_key
        self.seed = seed
        self.content_aware_strength = content_aware_strength
        self.patch_size = patch_size
        self.foreground_threshold = foreground_threshold

    def __call__(
        self,
        batchdata: Mapping[str, Any] | torch.Tensor | Sequence[torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, Any]]:
        if isinstance(batchdata, Mapping):
            if self.image_key not in batchdata:
                raise ValueError(f"batch has no '{self.image_key}' entry; keys are {sorted(batchdata)}.")
            images = batchdata[self.image_key]
        elif isinstance(batchdata, torch.Tensor):
            images = batchdata
        else:
            images = batchdata[0]
        images = as_plain_tensor(images).to(device=device, non_blocking=non_blocking, **kwargs)
        net_kwargs: dict[str, Any] = {}
        if self.seed is not None:
            net_kwargs["generator"] = torch.Generator(device=images.device).manual_seed(self.seed)
        if self.content_aware_strength > 0:
            net_kwargs["mask_weights"] = content_aware_weights(
                images, self.patch_size, self.foreground_threshold, self.content_aware_strength
            )
        return images, images, (), net_kwargs
