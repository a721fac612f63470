"""Position tables: N-D sin-cos embeddings for any width, the tables of each ``pos_embed_type``, and
their rebuilding or interpolation for another patch grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.pos_embed_utils import build_fourier_position_embedding

__all__ = ["sincos_pos_embed", "interpolate_pos_embed", "axis_widths", "make_pos_embed", "pos_embed_for_grid"]

# MONAI's build_sincos_position_embedding concatenates the axes in the order (w, h, d); keeping that
# order makes our table identical to MONAI's wherever MONAI's is defined (width % (2 * dims) == 0).
_AXIS_ORDER = {1: (0,), 2: (1, 0), 3: (1, 0, 2)}


def axis_widths(embed_dim: int, spatial_dims: int) -> list[int]:
    """How many channels each axis gets: sin/cos pairs spread as evenly as possible.

    The first axes (in concatenation order) get the extra pairs; an odd width leaves one zero channel
    at the end.
    """
    pairs = embed_dim // 2
    base, extra = divmod(pairs, spatial_dims)
    return [2 * (base + (1 if i < extra else 0)) for i in range(spatial_dims)]


def sincos_pos_embed(
    grid_size: Sequence[int], embed_dim: int, temperature: float = 10000.0, device: torch.device | None = None
) -> torch.Tensor:
    """Fixed sin-cos position embedding of a patch grid, for 1, 2 or 3 axes and any ``embed_dim``.

    For widths that MONAI supports (divisible by 4 in 2D, by 6 in 3D) the table equals
    ``monai.networks.blocks.pos_embed_utils.build_sincos_position_embedding``; other widths spread
    the frequencies unevenly over the axes instead of failing.

    Args:
        grid_size: patches per axis ``G``; tokens are in row-major order over ``G``.
        embed_dim: width ``D`` (at least ``2 * len(grid_size)``).
        temperature: the frequency base. Defaults to 10000.
        device: where to build the table.

    Returns:
        ``(1, prod(G), D)`` float32 tensor.

    Raises:
        ValueError: for an unsupported number of axes or a width too small to give each axis a pair.
    """
    grid_size = tuple(int(g) for g in grid_size)
    dims = len(grid_size)
    if dims not in _AXIS_ORDER:
        raise ValueError(f"grid_size must have 1, 2 or 3 entries, got {grid_size}.")
    if embed_dim < 2 * dims:
        raise ValueError(f"embed_dim must be at least {2 * dims} for a {dims}-axis sin-cos embedding, got {embed_dim}.")
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float32, device=device) for g in grid_size], indexing="ij")
    parts = []
    for axis, width in zip(_AXIS_ORDER[dims], axis_widths(embed_dim, dims)):
        n_freq = width // 2
        omega = 1.0 / temperature ** (torch.arange(n_freq, dtype=torch.float32, device=device) / n_freq)
        angles = coords[axis].reshape(-1, 1) * omega  # (N, n_freq)
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)  # (N, D or D - 1)
    if table.shape[1] < embed_dim:
        table = F.pad(table, (0, embed_dim - table.shape[1]))
    return table.unsqueeze(0)


def interpolate_pos_embed(
    pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], mode: str | None = None
) -> torch.Tensor:
    """Resample a position embedding from one patch grid to another.

    Args:
        pos_embed: ``(1, prod(old_grid), D)`` (or ``(B, ...)``).
        old_grid: the grid the table was built for.
        new_grid: the grid wanted.
        mode: interpolation mode; defaults to ``bilinear`` (2 axes) / ``trilinear`` (3 axes).

    Returns:
        ``(1, prod(new_grid), D)``; the input itself when the grids are equal.

    Raises:
        ValueError: when the table does not have ``prod(old_grid)`` tokens or the grids differ in length.
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if len(old_grid) != len(new_grid):
        raise ValueError(f"old_grid {old_grid} and new_grid {new_grid} have different numbers of axes.")
    if pos_embed.ndim != 3 or pos_embed.shape[1] != math.prod(old_grid):
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not hold prod({old_grid}) = {math.prod(old_grid)} tokens."
        )
    if old_grid == new_grid:
        return pos_embed
    mode = mode or {1: "linear", 2: "bilinear", 3: "trilinear"}[len(old_grid)]
    batch, _, width = pos_embed.shape
    volume = pos_embed.transpose(1, 2).reshape(batch, width, *old_grid)  # (B, D, *G_old)
    resized = F.interpolate(volume.float(), size=new_grid, mode=mode, align_corners=False)
    return resized.reshape(batch, width, -1).transpose(1, 2).to(pos_embed.dtype)  # (B, N_new, D)


def make_pos_embed(kind: str, grid: Sequence[int], width: int) -> nn.Parameter:
    """A ``(1, prod(grid), width)`` position table of ``kind``; fixed (no grad) for sin-cos and Fourier.

    ``kind``: ``"none"`` (zeros, trainable as in MONAI), ``"learnable"`` (truncated normal, std 0.02),
    ``"sincos"``, ``"fourier"`` (MONAI's) or ``"rope"``: positions enter through rotary embeddings in the
    attention instead, and the table is a fixed zero one, kept so that the weights still load into
    MONAI's ``ViT`` / ``UNETR``.
    """
    if kind == "rope":
        return nn.Parameter(torch.zeros(1, math.prod(grid), width), requires_grad=False)
    if kind == "sincos":
        return nn.Parameter(sincos_pos_embed(grid, width), requires_grad=False)
    if kind == "fourier":
        return build_fourier_position_embedding(list(grid), width, len(grid))
    table = nn.Parameter(torch.zeros(1, math.prod(grid), width))
    if kind == "learnable":
        nn.init.trunc_normal_(table, std=0.02, a=-2.0, b=2.0)
    return table


def pos_embed_for_grid(table: torch.Tensor, kind: str, built: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """The ``(1, prod(built), D)`` table of ``kind`` made for patch grid ``built``, for patch grid ``grid``:
    itself when the grids agree, rebuilt for sin-cos, interpolated otherwise; ``(1, prod(grid), D)``."""
    if grid == built:
        return table
    if kind == "sincos":
        # rebuilt exactly for the new grid, times the stored table's scale (1 unless the residual stream was
        # rescaled: see monai_mae.networks.residual.rescale_residual_stream)
        unit = sincos_pos_embed(built, table.shape[-1], device=table.device)
        scale = (table.float() * unit).sum() / unit.square().sum()
        return (sincos_pos_embed(grid, table.shape[-1], device=table.device) * scale).to(table.dtype)
    return interpolate_pos_embed(table, built, grid)
