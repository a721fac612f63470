"""``MaskedImageModel``: masked-image pretraining of a convolutional segmentation network.

The recipe of nnssl's CNN pretraining (and SimMIM's): the input is cut into a grid of patches, a random
subset is masked with the same ``torch.multinomial`` draw the MAE uses
(:func:`~monai_mae.networks.masking.random_masking`), the masked voxels are replaced (by zero, by each image's
mean over its visible voxels, or by a learned value per channel), and the whole encoder-decoder network, built
with ``in_channels`` outputs, reconstructs the image. The output is returned in the MAE's patch layout with the
MAE's mask, so :class:`~monai_mae.losses.MaskedReconstructionLoss`, ``MAEPrepareBatch`` and the ``mae_pretrain``
bundle train it unchanged. Fine-tuning starts the same network with its weights (every layer but the output head):
:func:`load_mim_weights`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.utils import ensure_tuple_rep, look_up_option

from monai_mae.networks.checkpoint_adapters import tensors_of
from monai_mae.networks.cnn import CNN_ARCHITECTURES, cnn_network
from monai_mae.networks.masking import num_visible, random_masking
from monai_mae.networks.patching import patch_grid, patchify
from monai_mae.utils import unwrap

__all__ = ["MaskedImageModel", "MASK_FILLS", "load_mim_weights", "WEIGHTS_PREFIX"]

logger = logging.getLogger(__name__)

#: How masked voxels are replaced: ``"zero"`` (the windowed image's minimum, in CT the value of air), ``"mean"``
#: (each image's mean over its visible voxels, per channel: near what nnssl's zero is after z-score normalisation)
#: or ``"learned"`` (one trained value per channel).
MASK_FILLS = ("zero", "mean", "learned")
#: The wrapped network's parameters are stored under this prefix (``network.``).
WEIGHTS_PREFIX = "network."


class MaskedImageModel(nn.Module):
    """A convolutional network trained to fill in masked patches of its input.

    Args:
        architecture: the network, one of :data:`~monai_mae.networks.cnn.CNN_ARCHITECTURES`
            (``"unet"``, ``"dynunet"``, ``"segresnet"``).
        in_channels: image channels (the network also predicts this many).
        img_size: the training crop; ``dynunet`` plans its stages from it.
        patch_size: masking granularity, an int or one side per axis; every input side must be a multiple.
            Defaults to 8.
        masking_ratio: fraction of patches masked, in ``[0, 1)``. Defaults to 0.75.
        spatial_dims: 2 or 3. Defaults to 3.
        spacing: voxel size in mm for the ``dynunet`` plan (None: isotropic).
        mask_fill: ``"zero"``, ``"mean"`` or ``"learned"`` (see :data:`MASK_FILLS`). Defaults to ``"zero"``.
        options: the network's constructor arguments (see :func:`~monai_mae.networks.cnn.cnn_network`).

    Raises:
        ValueError: for an unknown architecture or fill, a bad ratio or patch size.

    Examples::

        >>> mim = MaskedImageModel("unet", 1, img_size=32, patch_size=8, options={"channels": [4, 8], "strides": [2]})
        >>> pred, mask = mim(torch.rand(2, 1, 32, 32, 32))
        >>> pred.shape, mask.shape, int(mask.sum())  # (B, N, 8^3 * C); 48 of 64 patches masked per volume
        (torch.Size([2, 64, 512]), torch.Size([2, 64]), 96)
    """

    def __init__(
        self,
        architecture: str,
        in_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int = 8,
        masking_ratio: float = 0.75,
        spatial_dims: int = 3,
        spacing: Sequence[float] | float | None = None,
        mask_fill: str = "zero",
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        architecture = look_up_option(architecture, CNN_ARCHITECTURES)
        mask_fill = look_up_option(mask_fill, MASK_FILLS)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if not 0.0 <= float(masking_ratio) < 1.0:
            raise ValueError(f"masking_ratio must be in [0, 1), got {masking_ratio}.")
        self.patch_size = tuple(int(p) for p in ensure_tuple_rep(patch_size, spatial_dims))
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}.")
        img = tuple(int(s) for s in ensure_tuple_rep(img_size, spatial_dims))
        patch_grid(img, self.patch_size)  # raises for a crop that is not a multiple of the patch
        self.architecture = architecture
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.masking_ratio = float(masking_ratio)
        self.mask_fill = mask_fill
        self.network = cnn_network(architecture, in_channels, in_channels, spatial_dims, img, spacing, options)
        fill = torch.zeros(1, in_channels, *([1] * spatial_dims))
        self.mask_token = nn.Parameter(fill) if mask_fill == "learned" else None
        self.register_buffer("zero_fill", fill, persistent=False)
        spec = {k: v for k, v in self.network.network_spec.items() if k not in ("_target_", "spatial_dims")}
        for key in ("in_channels", "out_channels"):
            spec.pop(key)
        self.init_args = {
            "architecture": architecture, "in_channels": in_channels, "img_size": list(img),
            "patch_size": list(self.patch_size), "masking_ratio": self.masking_ratio, "spatial_dims": spatial_dims,
            "spacing": None if spacing is None else [float(s) for s in ensure_tuple_rep(spacing, spatial_dims)],
            "mask_fill": mask_fill, "options": spec,
        }  # fmt: skip

    def mask_voxels(self, mask: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
        """Per-voxel mask from the per-patch one.

        Args:
            mask: ``(B, N)`` with 1 = masked, patches in row-major grid order.
            spatial_size: the image's ``(H, W[, D])``.

        Returns:
            ``(B, 1, H, W[, D])`` of ``mask``'s dtype.
        """
        grid = patch_grid(spatial_size, self.patch_size)
        voxels = mask.reshape(mask.shape[0], 1, *grid)
        for axis, size in enumerate(self.patch_size):
            voxels = voxels.repeat_interleave(size, dim=2 + axis)
        return voxels

    def forward(
        self,
        x: torch.Tensor,
        masking_ratio: float | None = None,
        generator: torch.Generator | None = None,
        mask_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, reconstruct, and return the reconstruction in patch layout.

        Args:
            x: ``(B, C, H, W[, D])``.
            masking_ratio: overrides the constructor's ratio for this call.
            generator: a ``torch.Generator`` on ``x``'s device for reproducible masks.
            mask_weights: ``(B, N)`` relative probabilities of a patch being kept visible (content-aware masking).

        Returns:
            ``(pred, mask)``: ``pred (B, N, prod(P) * C)`` as :func:`~monai_mae.networks.patching.patchify` lays
            out the image, ``mask (B, N)`` with 1 = masked.

        Raises:
            ValueError: for an input of the wrong rank or channels, or sides that are not multiples of the patch.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {', '.join('S' * self.spatial_dims)}), got {tuple(x.shape)}."
            )
        spatial = tuple(x.shape[2:])
        grid = patch_grid(spatial, self.patch_size)  # raises when a side is not a multiple of the patch
        slots = x.new_zeros(x.shape[0], int(torch.Size(grid).numel()), 1)  # (B, N, 1): only the mask is used
        ratio = self.masking_ratio if masking_ratio is None else masking_ratio
        num_visible(slots.shape[1], ratio)  # a bad ratio is reported as masking_ratio
        mask = random_masking(slots, ratio, weights=mask_weights, generator=generator).mask.to(x.dtype)  # (B, N)
        voxels = self.mask_voxels(mask, spatial)  # (B, 1, *S)
        keep = 1 - voxels
        if self.mask_fill == "mean":  # per image and channel, from the visible voxels only; no host sync
            dims = tuple(range(2, x.ndim))
            fill = (x * keep).sum(dims, keepdim=True) / keep.sum(dims, keepdim=True).clamp_min(1)
        else:
            fill = (self.zero_fill if self.mask_token is None else self.mask_token).to(x.dtype)
        masked_input = x * keep + fill * voxels
        return patchify(self.network(masked_input), self.patch_size), mask


def load_mim_weights(
    network: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "the state dict",
    min_fraction: float = 0.5,
) -> dict[str, list[str]]:
    """Load a :class:`MaskedImageModel`'s network weights into a segmentation network of the same architecture.

    Every tensor whose name (after the ``network.`` prefix) and shape match is copied; the output head, which
    has ``in_channels`` outputs in pretraining and the number of classes here, stays as built. The names loaded
    are kept on the network as ``pretrained_names`` (a frozenset), so that
    :func:`~monai_mae.engines.finetune.layerwise_lr_groups` can give them a lower learning rate.

    Args:
        network: the segmentation network (built with :func:`~monai_mae.networks.cnn.cnn_network` and the
            pretrained file's options); DDP / compile wrappers are unwrapped.
        state_dict: a :class:`MaskedImageModel`'s state dict (e.g. ``read_model(path).state_dict`` of a model
            file of the ``mae_pretrain`` bundle); ``module.`` (DDP) / ``_orig_mod.`` (``torch.compile``) prefixes
            are removed.
        source: what to call it in messages.
        min_fraction: raise when fewer than this fraction of ``network``'s tensors load. Defaults to 0.5.

    Returns:
        ``{"loaded": [...], "skipped": [...], "missing": [...]}``: names loaded, checkpoint tensors that did not
        fit (name in the network but another shape), and network tensors left as built.

    Raises:
        ValueError: when the checkpoint holds no ``network.`` tensors, or too little of the network loads (the
            message names the counts and the first misfits).
    """
    state = tensors_of(state_dict)
    weights = {k[len(WEIGHTS_PREFIX) :]: v for k, v in state.items() if k.startswith(WEIGHTS_PREFIX)}
    if not weights:
        raise ValueError(
            f"{source} holds no masked-image-model weights (no '{WEIGHTS_PREFIX}*' tensors); it is not a "
            "MaskedImageModel checkpoint."
        )
    target = unwrap(network).state_dict()
    fits = {k: v for k, v in weights.items() if k in target and tuple(target[k].shape) == tuple(v.shape)}
    skipped = sorted(k for k in weights if k in target and k not in fits)
    missing = sorted(k for k in target if k not in fits)
    if len(fits) < min_fraction * len(target):
        raise ValueError(
            f"{source} fits only {len(fits)} of the {len(target)} tensors of {type(unwrap(network)).__name__} "
            f"(first missing: {missing[:3]}); was it pretrained with another architecture or other options?"
        )
    unwrap(network).load_state_dict({**target, **fits})
    unwrap(network).pretrained_names = frozenset(fits)  # for a lower learning rate on them (encoder_lr_scale)
    logger.debug(
        f"load_mim_weights: {len(fits)} of {len(target)} tensors loaded from {source}; left as built: {missing}."
    )
    return {"loaded": sorted(fits), "skipped": skipped, "missing": missing}
