"""Images for display from patch predictions: the reconstruction, and the input with its masked patches hidden.

Both work on the token layout of :mod:`monai_mae.networks.patching` and are used by
:class:`~monai_mae.networks.mae.MAEReconstructor` and the picture handlers; they are also exported
from :mod:`monai_mae.losses` and :mod:`monai_mae`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import ensure_tuple_rep

from monai_mae.networks.patching import patchify, unpatchify

__all__ = ["reconstruct_image", "masked_input"]


def reconstruct_image(
    pred: torch.Tensor,
    mask: torch.Tensor,
    images: torch.Tensor,
    patch_size: Sequence[int] | int,
    norm_pix_loss: bool = False,
    paste_visible: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Turn predicted patches back into an image for display.

    With ``norm_pix_loss`` the predictions are per-patch normalised; they are brought back to
    intensities with the statistics of the *visible* patches (mean of their means and of their
    standard deviations, per sample), so nothing hidden from the network is used.

    Args:
        pred: ``(B, N, prod(P) * C)``.
        mask: ``(B, N)``, 1 = masked.
        images: ``(B, C, *S)`` the input.
        patch_size: per-axis patch size.
        norm_pix_loss: whether ``pred`` is in the normalised space.
        paste_visible: put the input's visible patches back, showing only masked ones predicted.
        eps: variance floor.

    Returns:
        ``(B, C, *S)`` reconstruction.

    Examples::

        >>> images = torch.rand(2, 1, 32, 32)
        >>> pred, mask = torch.zeros(2, 4, 256), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]])
        >>> recon = reconstruct_image(pred, mask, images, 16, paste_visible=True)
        >>> recon.shape
        torch.Size([2, 1, 32, 32])
        >>> bool(recon[0, :, :16, :16].eq(0).all()), bool(recon[0, :, 16:, 16:].equal(images[0, :, 16:, 16:]))
        (True, True)
    """
    patch = tuple(ensure_tuple_rep(patch_size, images.ndim - 2))
    target = patchify(images.float(), patch)  # (B, N, K)
    pred = pred.detach().float()
    visible = (1.0 - mask.float()).unsqueeze(-1)  # (B, N, 1)
    if norm_pix_loss:
        n_visible = visible.sum(dim=1).clamp_min(1.0)  # (B, 1)
        mean = (target.mean(-1, keepdim=True) * visible).sum(1) / n_visible  # (B, 1)
        std = ((target.var(-1, keepdim=True, unbiased=False) + eps).sqrt() * visible).sum(1) / n_visible
        pred = pred * std.unsqueeze(1) + mean.unsqueeze(1)
    if paste_visible:
        pred = torch.where(visible.bool(), target, pred)
    return unpatchify(pred, patch, images.shape[2:], images.shape[1])


def masked_input(
    images: torch.Tensor, mask: torch.Tensor, patch_size: Sequence[int] | int, fill: float = 0.0
) -> torch.Tensor:
    """The input with its masked patches replaced by ``fill``.

    Args:
        images: ``(B, C, *S)``.
        mask: ``(B, N)``, 1 = masked.
        patch_size: per-axis patch size.
        fill: the value shown in masked patches. Defaults to 0.

    Returns:
        ``(B, C, *S)``.

    Examples::

        >>> shown = masked_input(torch.ones(1, 1, 32, 32), torch.tensor([[0.0, 1, 0, 0]]), 16, fill=-1.0)
        >>> shown[0, 0, 0, ::16].tolist()  # first row: a visible patch, then the masked one
        [1.0, -1.0]
    """
    patch = tuple(ensure_tuple_rep(patch_size, images.ndim - 2))
    patches = patchify(images, patch)
    patches = torch.where(mask.bool().unsqueeze(-1), torch.full_like(patches, fill), patches)
    return unpatchify(patches, patch, images.shape[2:], images.shape[1])
