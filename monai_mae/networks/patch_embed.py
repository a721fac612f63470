"""Patch projection plus position table, applied to any subset of an input's patches (the visible ones)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from monai.networks.layers import Conv
from monai.utils import look_up_option

from monai_mae.networks.masking import split_indices
from monai_mae.networks.patching import patch_grid, patch_pattern
from monai_mae.networks.pos_embed import make_pos_embed, pos_embed_for_grid

__all__ = ["VisiblePatchEmbedding", "SUPPORTED_PROJ_TYPES", "SUPPORTED_POS_EMBED_TYPES"]

SUPPORTED_PROJ_TYPES = ("conv", "perceptron")
SUPPORTED_POS_EMBED_TYPES = ("none", "learnable", "sincos", "fourier", "rope")


class VisiblePatchEmbedding(nn.Module):
    """Patch projection and position embedding applied to the visible tokens only.

    Holds the same parameters, under the same names, as MONAI's ``PatchEmbeddingBlock``
    (``patch_embeddings.*``, ``position_embeddings``), so weights move freely between this module,
    MONAI's ``MaskedAutoEncoderViT``, ``ViT`` and ``UNETR``. The conv kernel is applied as a
    matrix product on patchified tokens, which gives the conv's result on the chosen patches
    without touching the others.

    Args:
        in_channels: input channels ``C``.
        img_size: the spatial size the position table is built for.
        patch_size: per-axis patch size ``P``.
        hidden_size: token width.
        proj_type: ``"conv"`` or ``"perceptron"`` (same parameters as MONAI's).
        pos_embed_type: ``"none"``, ``"learnable"``, ``"sincos"``, ``"fourier"`` or ``"rope"`` (no
            additive table: a fixed zero one, positions come from rotary embeddings in attention).
        dropout_rate: dropout after adding the position embedding.
        spatial_dims: 2 or 3.
        abs_pos_embed: keyword-only, ``pos_embed_type="rope"`` only: the table is a learnable one (truncated
            normal, std 0.02) added to the tokens, with the rotary embeddings in attention on top (EVA-02 /
            Primus' ``pos_embed``). Defaults to False.

    Raises:
        ValueError: for an unknown ``proj_type`` / ``pos_embed_type``, or ``abs_pos_embed`` without RoPE.
    """

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int],
        patch_size: Sequence[int],
        hidden_size: int,
        proj_type: str = "conv",
        pos_embed_type: str = "sincos",
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        *,
        abs_pos_embed: bool = False,
    ) -> None:
        super().__init__()
        self.proj_type = look_up_option(proj_type, SUPPORTED_PROJ_TYPES)
        self.pos_embed_type = look_up_option(pos_embed_type, SUPPORTED_POS_EMBED_TYPES)
        if abs_pos_embed and self.pos_embed_type != "rope":
            raise ValueError(
                f"abs_pos_embed=True adds a learnable table to RoPE and needs pos_embed_type='rope', got "
                f"pos_embed_type={pos_embed_type!r} (use pos_embed_type='learnable' for a table alone)."
            )
        #: whether the table is added to the tokens (every kind but plain RoPE)
        self.adds_table = self.pos_embed_type != "rope" or bool(abs_pos_embed)
        #: the kind of the table itself (how it is made and resampled for another grid)
        self.table_kind = "learnable" if abs_pos_embed else self.pos_embed_type
        self.in_channels = in_channels
        self.patch_size = tuple(patch_size)
        self.grid_size = patch_grid(img_size, patch_size, name="img_size")
        self.n_patches = math.prod(self.grid_size)
        self.patch_dim = in_channels * math.prod(self.patch_size)
        self.patch_embeddings: nn.Module
        if self.proj_type == "conv":
            self.patch_embeddings = Conv[Conv.CONV, spatial_dims](
                in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size
            )
        else:
            image_pattern, token_pattern = patch_pattern(spatial_dims)
            sizes = {f"p{i + 1}": p for i, p in enumerate(self.patch_size)}
            self.patch_embeddings = nn.Sequential(
                Rearrange(f"{image_pattern} -> {token_pattern}", **sizes), nn.Linear(self.patch_dim, hidden_size)
            )
        self.position_embeddings = make_pos_embed(self.table_kind, self.grid_size, hidden_size)
        self.dropout = nn.Dropout(dropout_rate)
        layer = self.patch_embeddings if self.proj_type == "conv" else self.patch_embeddings[1]
        with torch.no_grad():  # initialise the projection like a linear layer (MAE paper)
            nn.init.xavier_uniform_(layer.weight.view(hidden_size, -1))
            nn.init.zeros_(layer.bias)

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """Apply the projection to patches ``(B, M, prod(P) * C)`` in token layout: ``(B, M, D)``."""
        if self.proj_type == "conv":
            conv = self.patch_embeddings
            # reorder the (few) visible patches to the kernel's channel-first layout rather than permuting the
            # kernel: the weight's gradient then keeps the parameter's own strides (what DDP buckets expect)
            channel_first = rearrange(patches, "b m (p c) -> b m (c p)", c=self.in_channels)
            return F.linear(channel_first, conv.weight.view(conv.out_channels, -1), conv.bias)
        return self.patch_embeddings[1](patches)

    def pos_embed(self, grid: tuple[int, ...]) -> torch.Tensor:
        """``(1, prod(grid), D)`` position table for ``grid``."""
        return pos_embed_for_grid(self.position_embeddings, self.table_kind, self.grid_size, grid)

    def embed_all(self, patches: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Embed every patch ``(B, N, prod(P) * C)`` of an input with patch grid ``grid``: ``(B, N, D)``."""
        tokens = self.project(patches)
        if self.adds_table:
            tokens = tokens + self.pos_embed(grid)
        return self.dropout(tokens)

    def forward(self, patches: torch.Tensor, visible: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Embed the kept patches.

        Args:
            patches: ``(B, N_keep, prod(P) * C)`` visible patches, in grid order.
            visible: ``(B, N_keep)`` their ascending indices (``MaskingResult.visible_indices``), or the
                ``(B, N)`` bool keep-mask they were selected with (the indices are then derived from it,
                without reading anything back from the device).
            grid: the input's patch grid (``prod(grid) == N``).

        Returns:
            ``(B, N_keep, D)`` embedded tokens.
        """
        tokens = self.project(patches)  # (B, N_keep, D)
        if self.adds_table:
            if visible.dtype == torch.bool:
                visible = split_indices(visible, patches.shape[1])[0]
            tokens = tokens + self.pos_embed(grid)[0][visible]  # (B, N_keep, D)
        return self.dropout(tokens)
