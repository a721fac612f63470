"""Masked reconstruction loss (MSE over the masked patches, optionally plus the visible ones)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.utils import ensure_tuple_rep

from monai_mae.networks.patching import patchify

__all__ = [
    "MaskedReconstructionLoss",
    "VISIBLE_WEIGHT_FOR",
    "check_visible_weight",
    "normalize_patches",
    "visible_weight_for",
]

#: The ``visible_loss_weight`` that pretraining uses by default, by the network that will be fine-tuned from it.
#: ``vitseg`` 1.0: its light decoder reads only the encoder's last layer, which the visible-patch term makes keep
#: each patch's own detail (on the anatomical phantoms pretraining paid for ViTSeg only with it, see
#: docs/pretraining_study.md). 0.0 (the MAE paper's loss) for the rest: UNETR reads blocks 3/6/9 and the image
#: as well, a CNN reads its own full-resolution features; on both phantom settings the visible term made the
#: masked-image UNet's masked-patch reconstruction worse and its fine-tuning no better (docs/defaults.md).
VISIBLE_WEIGHT_FOR: dict[str, float] = {"vitseg": 1.0, "unetr": 0.0, "unet": 0.0, "dynunet": 0.0, "segresnet": 0.0}


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch zero mean, unit variance (the MAE paper's norm-pix target).

    Args:
        patches: ``(B, N, K)``; statistics over the last axis.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


class MaskedReconstructionLoss(nn.Module):
    """Mean squared error over the masked patches (the MAE paper's loss), plus optionally the visible ones.

    With ``visible_weight=w > 0`` the loss is ``mse(masked) + w * mse(visible)``: the decoder must
    also give back the patches the encoder saw, so the encoder's last layer keeps each visible
    patch's own detail instead of only what predicts its masked neighbours. That detail is what a
    light segmentation decoder reading only the last layer (:class:`~monai_mae.networks.vitseg.ViTSeg`)
    needs; see ``docs/pretraining_study.md``. The self-attention decoder predicts every patch;
    the cross decoder (``decoder_type="cross"``) predicts none of the visible ones, so use 0 there
    (:func:`check_visible_weight`).

    Args:
        patch_size: the network's per-axis patch size.
        spatial_dims: 2 or 3. Defaults to 3.
        norm_pix_loss: compare with per-patch normalised targets (MAE paper). Defaults to False.
        eps: variance floor for ``norm_pix_loss``.
        visible_weight: keyword-only. Weight of the visible patches' mean squared error, >= 0.
            Defaults to 0 (masked patches only: the MAE paper, and MONAI's behaviour).

    Called as ``loss((pred, mask), images)`` with ``pred (B, N, prod(P) * C)``, ``mask (B, N)``
    (1 = masked) and ``images (B, C, *S)``; returns a scalar computed in float32.

    Examples::

        >>> loss_fn = MaskedReconstructionLoss(patch_size=16, spatial_dims=3)
        >>> images = torch.ones(2, 1, 32, 32, 32)  # 8 patches of 16^3 voxels
        >>> pred, mask = torch.zeros(2, 8, 4096), torch.zeros(2, 8)
        >>> mask[:, :6] = 1.0  # 6 masked patches, predicted 0 where the image is 1
        >>> loss_fn((pred, mask), images)  # in training: loss_fn(net(images), images)
        tensor(1.)
        >>> pred[:, 6:] = 1.0  # the 2 visible patches exactly right: only the masked error counts
        >>> MaskedReconstructionLoss(16, visible_weight=0.5)((pred, mask), images)
        tensor(1.)
    """

    def __init__(
        self,
        patch_size: Sequence[int] | int,
        spatial_dims: int = 3,
        norm_pix_loss: bool = False,
        eps: float = 1e-6,
        *,
        visible_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if isinstance(visible_weight, bool) or not isinstance(visible_weight, (int, float)) or not visible_weight >= 0:
            raise ValueError(f"visible_weight must be a number >= 0, got {visible_weight!r}.")
        self.visible_weight = float(visible_weight)
        self.patch_size = tuple(ensure_tuple_rep(patch_size, spatial_dims))
        self.spatial_dims = spatial_dims
        self.norm_pix_loss = norm_pix_loss
        self.eps = eps

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, N, prod(P) * C)`` the patches the prediction is compared with."""
        patches = patchify(images.float(), self.patch_size)
        return normalize_patches(patches, self.eps) if self.norm_pix_loss else patches

    def forward(self, outputs: tuple[torch.Tensor, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
            raise ValueError("MaskedReconstructionLoss expects outputs=(pred, mask) as returned by MAEViT.")
        pred, mask = outputs
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"images must have {self.spatial_dims} spatial dimensions, got shape {tuple(images.shape)}."
            )
        target = self.target(images)
        if pred.shape != target.shape or mask.shape != target.shape[:2]:
            raise ValueError(
                f"pred {tuple(pred.shape)} / mask {tuple(mask.shape)} do not match the patchified images "
                f"{tuple(target.shape)} (patch size {self.patch_size})."
            )
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
        mask = mask.float()
        loss = (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
        if self.visible_weight:
            visible = 1.0 - mask
            loss = loss + self.visible_weight * (per_patch * visible).sum() / visible.sum().clamp_min(1.0)
        return loss


def check_visible_weight(visible_weight: float, decoder_type: str) -> float:
    """``visible_weight`` for a :class:`MaskedReconstructionLoss` behind an MAE with ``decoder_type``.

    The cross decoder reconstructs only (some of) the masked patches and returns zeros for the
    visible ones, so a visible-patch term would train towards zeros.

    Raises:
        ValueError: for ``visible_weight > 0`` with ``decoder_type="cross"`` (names both settings).
    """
    if visible_weight and decoder_type == "cross":
        raise ValueError(
            f"visible_loss_weight={visible_weight} needs decoder_type='self': the cross decoder "
            "(decoder_type='cross') does not reconstruct the visible patches; set one of them back."
        )
    return visible_weight


def visible_weight_for(architecture: str) -> float:
    """The default ``visible_loss_weight`` of a pretraining meant for fine-tuning ``architecture``.

    Args:
        architecture: the network ``mae_finetune`` will build from the pretrained file, a key of
            :data:`VISIBLE_WEIGHT_FOR`.

    Raises:
        ValueError: for an architecture not in :data:`VISIBLE_WEIGHT_FOR` (the message lists them).

    Examples::

        >>> visible_weight_for("vitseg"), visible_weight_for("unetr")
        (1.0, 0.0)
    """
    if architecture not in VISIBLE_WEIGHT_FOR:
        raise ValueError(f"finetune_architecture={architecture!r}: expected one of {', '.join(VISIBLE_WEIGHT_FOR)}.")
    return VISIBLE_WEIGHT_FOR[architecture]
