"""Axial rotary position embeddings (RoPE) for 2D and 3D token grids.

Each token is rotated by its own grid coordinates, so attention logits depend on coordinate
differences only: any grid size and any subset of tokens (the visible ones of an MAE) works without
tables or interpolation. :class:`AxialRoPE` makes the ``(cos, sin)`` tables; :func:`apply_rope` and
:func:`apply_rope_qkv` rotate queries and keys with them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Rope", "AxialRoPE", "apply_rope", "apply_rope_qkv", "grid_coordinates"]

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (B or 1, 1, M, R)


def grid_coordinates(
    grid: Sequence[int], indices: torch.Tensor | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Integer grid coordinates of tokens in row-major order over ``grid``.

    Args:
        grid: patches per axis ``G``.
        indices: ``(B, M)`` flat token indices (e.g. the visible ones); None means every token.
        device: device of the result when ``indices`` is None.

    Returns:
        ``(B, M, len(grid))`` (or ``(1, prod(G), len(grid))`` for every token), float32.
    """
    if indices is None:
        indices = torch.arange(math.prod(grid), device=device)[None]
    coords = []
    stride = math.prod(grid)
    for size in grid:  # row-major: the first axis varies slowest
        stride //= size
        coords.append(torch.div(indices, stride, rounding_mode="floor") % size)
    return torch.stack(coords, dim=-1).float()


class AxialRoPE(nn.Module):
    """Axial rotary position embedding for 2D or 3D token grids.

    Each head's channels are split into ``spatial_dims`` equal groups of rotation pairs, one group
    per axis; pair ``i`` of an axis rotates by ``coordinate * theta ** (-i / pairs_per_axis)``. The
    attention logit between two rotated tokens then depends on their coordinate difference only, so
    any grid size and any subset of tokens (the visible ones) works without tables or interpolation.
    Channels left over when ``head_dim`` is not a multiple of ``2 * spatial_dims`` are not rotated.

    Args:
        head_dim: channels per attention head (at least ``2 * spatial_dims``).
        spatial_dims: 2 or 3.
        theta: frequency base. Defaults to 100 (grids of tens of patches, not thousands of words).

    Raises:
        ValueError: when ``head_dim`` is too small or ``theta`` is not > 1.
    """

    def __init__(self, head_dim: int, spatial_dims: int, theta: float = 100.0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        pairs = head_dim // (2 * spatial_dims)
        if pairs < 1:
            raise ValueError(f"RoPE needs head_dim >= 2 * spatial_dims = {2 * spatial_dims}, got head_dim={head_dim}.")
        if not theta > 1:
            raise ValueError(f"rope_theta must be > 1, got {theta}.")
        self.spatial_dims = spatial_dims
        self.rotated_pairs = pairs * spatial_dims
        self.register_buffer("freqs", theta ** (-torch.arange(pairs, dtype=torch.float32) / pairs), persistent=False)

    def forward(self, coords: torch.Tensor, prefix_tokens: int = 0) -> Rope:
        """``(cos, sin)``, each ``(B, 1, prefix + M, R)``, for tokens at ``coords`` ``(B, M, dims)``.

        ``prefix_tokens`` (a class token) come first and are not rotated (cos 1, sin 0).
        """
        angles = (coords[..., None] * self.freqs.to(coords.device)).flatten(-2)  # (B, M, R)
        if prefix_tokens:
            angles = F.pad(angles, (0, 0, prefix_tokens, 0))
        angles = angles[:, None]  # (B, 1, M', R): broadcast over heads
        return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` rotated by the angles of ``(cos, sin)``: channel ``j < R`` pairs with ``R + j``, channels from ``2R``
    on pass unchanged; computed in the wider of ``x``'s and the tables' dtypes, returned contiguous in ``x``'s."""
    r = cos.shape[-1]
    dtype = torch.promote_types(x.dtype, cos.dtype)
    x1, x2 = x[..., :r].to(dtype), x[..., r : 2 * r].to(dtype)
    parts = [torch.addcmul(x1 * cos, x2, sin, value=-1.0), torch.addcmul(x2 * cos, x1, sin)]  # x1 cos - x2 sin, ...
    if x.shape[-1] > 2 * r:
        parts.append(x[..., 2 * r :].to(dtype))
    return torch.cat(parts, dim=-1).to(x.dtype)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, M, head_dim)``: channel ``j < R`` pairs with channel ``R + j``; the rest pass.

    Any ``x (..., head_dim)`` works with ``cos`` / ``sin`` that broadcast against ``x[..., :R]``. The result
    is contiguous, in ``x``'s dtype (computed in float32 for bfloat16 ``x``). Plain tensor operations:
    autograd saves only the tables, and :func:`torch.compile` fuses them.
    """
    return _rotate(x, *rope)


def apply_rope_qkv(qkv: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate the queries and keys of a fused projection ``qkv`` ``(B, M, 3, H, head_dim)``; values pass.

    Args:
        qkv: the qkv projection viewed as ``(B, M, 3, H, head_dim)``.
        rope: ``(cos, sin)`` from :class:`AxialRoPE`, each ``(B or 1, 1, M, R)``.

    Returns:
        contiguous head-major ``(3, B, H, M, head_dim)`` (the layout SDPA's CPU kernel runs fastest in):
        ``q, k, v = out`` with ``q``, ``k`` equal to :func:`apply_rope` of the queries and keys.
    """
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, M, hd), views
    return torch.stack([_rotate(q, *rope), _rotate(k, *rope), v])
