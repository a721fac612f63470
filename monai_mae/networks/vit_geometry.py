"""What a ViT's modules tell about its input geometry: patch size and patch grid.

Used both to fit pretrained weights into a network (:mod:`monai_mae.networks.transfer`) and to
build a reference batch of the right size (:mod:`monai_mae.networks.residual`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn as nn

__all__ = ["GRID_AXES", "cubic_grid", "vit_grid", "vit_patch_size"]

#: einops names of the patch axes in MONAI's perceptron ``Rearrange`` (and in this package's token layout).
GRID_AXES = ("p1", "p2", "p3")


def vit_patch_size(vit: nn.Module, network: nn.Module) -> tuple[int, ...] | None:
    """Patch size of a perceptron projection: from its einops ``Rearrange`` or the network's ``patch_size``.

    Args:
        vit: the ViT encoder (``network`` itself or ``network.vit``).
        network: the network holding it.

    Returns:
        The per-axis patch size, or None when neither tells it.
    """
    for module in vit.patch_embedding.patch_embeddings.modules():
        lengths = getattr(module, "axes_lengths", None)
        if isinstance(lengths, Mapping) and lengths and all(a in lengths for a in GRID_AXES[: len(lengths)]):
            return tuple(int(lengths[a]) for a in GRID_AXES[: len(lengths)])
    size = getattr(network, "patch_size", None)
    return tuple(int(p) for p in size) if isinstance(size, Sequence) else None


def vit_grid(vit: nn.Module, network: nn.Module) -> tuple[int, ...] | None:
    """Patch grid of a ViT: ``network.feat_size`` (MONAI ``UNETR``) or ``vit.patch_embedding.grid_size``; None when unknown."""
    for owner, name in ((network, "feat_size"), (vit.patch_embedding, "grid_size")):
        grid = getattr(owner, name, None)
        if isinstance(grid, Sequence) and grid:
            return tuple(int(g) for g in grid)
    return None


def cubic_grid(n_tokens: int, dims: int | None) -> tuple[int, ...] | None:
    """``(g,) * dims`` when ``n_tokens == g ** dims``, else None (also for ``dims`` None or 0).

    Examples::

        >>> cubic_grid(216, 3), cubic_grid(196, 2), cubic_grid(200, 3)
        ((6, 6, 6), (14, 14), None)
    """
    if not dims:
        return None
    side = round(n_tokens ** (1.0 / dims))
    for g in (side - 1, side, side + 1):
        if g > 0 and g**dims == n_tokens:
            return (g,) * dims
    return None
