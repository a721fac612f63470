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

from monai_mae.utils import is_compiling

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


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """Write ``x`` rotated by ``sign * angle`` into ``out`` (same shape): channel ``j < R`` pairs with ``R + j``.

    ``cos`` / ``sin`` broadcast against ``x[..., :R]``; channels from ``2R`` on are copied unchanged. The
    products are formed in the wider of ``x``'s and the tables' dtypes (float32 for a bfloat16 ``x``) and
    written in ``out``'s: no temporary of ``x``'s size when the dtypes agree.
    """
    r = cos.shape[-1]
    x1, x2 = x[..., :r], x[..., r : 2 * r]
    o1, o2 = out[..., :r], out[..., r : 2 * r]
    if x.dtype == cos.dtype == out.dtype:
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)  # x1 cos - x2 sin
        torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)  # x2 cos + x1 sin
    else:
        dtype = torch.promote_types(x.dtype, cos.dtype)
        x1, x2 = x1.to(dtype), x2.to(dtype)
        o1.copy_(torch.addcmul(x1 * cos, x2, sin, value=-sign))
        o2.copy_(torch.addcmul(x2 * cos, x1, sin, value=sign))
    if x.shape[-1] > 2 * r:
        out[..., 2 * r :].copy_(x[..., 2 * r :])


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation as plain differentiable tensor operations (what :func:`torch.compile` traces and fuses)."""
    r = cos.shape[-1]
    dtype = torch.promote_types(x.dtype, cos.dtype)
    x1, x2, rest = x[..., :r].to(dtype), x[..., r : 2 * r].to(dtype), x[..., 2 * r :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


# torch >= 2.3; before, compiled graphs break at the eager rotation's out= products (still correct)
_is_compiling = is_compiling


class _Rotate(torch.autograd.Function):
    """Rotary embedding as one autograd node: the backward pass rotates the gradient back (a rotation's
    transpose is the rotation by minus the angle), so only the shared ``(cos, sin)`` tables are saved and
    forward and backward each write one output, without intermediate copies.

    ``qkv=False``: ``x (..., hd)`` -> contiguous ``(..., hd)``. ``qkv=True``: ``x (B, M, 3, H, hd)`` (a fused
    projection, token-major) -> contiguous head-major ``(3, B, H, M, hd)`` with queries and keys rotated
    and values copied: the layout in which SDPA's CPU kernel runs fastest, at no extra pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qkv: bool) -> torch.Tensor:
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise ValueError("the rotary (cos, sin) tables must not require gradients (AxialRoPE's never do).")
        ctx.save_for_backward(cos, sin)
        ctx.qkv = qkv
        if not qkv:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            _rotate_into(out, x, cos, sin, 1.0)
            return out
        batch, n_tokens, _, heads, head_dim = x.shape
        out = torch.empty(3, batch, heads, n_tokens, head_dim, dtype=x.dtype, device=x.device)
        _Rotate.rotate_qkv(out.permute(1, 3, 0, 2, 4), x, cos, sin, 1.0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if not ctx.qkv:
            grad_x = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
            _rotate_into(grad_x, grad, cos, sin, -1.0)
        else:
            grad = grad.permute(1, 3, 0, 2, 4)  # (B, M, 3, H, hd) view
            grad_x = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
            _Rotate.rotate_qkv(grad_x, grad, cos, sin, -1.0)
        return grad_x, None, None, None

    @staticmethod
    def rotate_qkv(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
        """``out``, ``x``: ``(B, M, 3, H, hd)`` (any strides); ``cos`` / ``sin``: ``(B, M, 1, 1, R)``."""
        _rotate_into(out[:, :, :2], x[:, :, :2], cos, sin, sign)  # queries and keys
        out[:, :, 2].copy_(x[:, :, 2])  # values pass


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, M, head_dim)``: channel ``j < R`` pairs with channel ``R + j``; the rest pass.

    Any ``x (..., head_dim)`` works with ``cos`` / ``sin`` that broadcast against ``x[..., :R]``. The result
    is contiguous, in ``x``'s dtype (computed in float32 for bfloat16 ``x``).
    """
    cos, sin = rope
    if _is_compiling():
        return _rotated(x, cos, sin)
    return _Rotate.apply(x, cos, sin, False)


def apply_rope_qkv(qkv: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate the queries and keys of a fused projection ``qkv`` ``(B, M, 3, H, head_dim)``; values pass.

    Args:
        qkv: the qkv projection viewed as ``(B, M, 3, H, head_dim)``.
        rope: ``(cos, sin)`` from :class:`AxialRoPE`, each ``(B or 1, 1, M, R)``.

    Returns:
        contiguous ``(3, B, H, M, head_dim)``: ``q, k, v = out`` with ``q``, ``k`` equal to
        :func:`apply_rope` of the queries and keys, in one pass forward and one backward.
    """
    if _is_compiling():
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return torch.stack([_rotated(q, *rope), _rotated(k, *rope), v])
    cos, sin = (t.transpose(1, 2).unsqueeze(2) for t in rope)  # (B, M, 1, 1, R): broadcast over q/k and heads
    return _Rotate.apply(qkv, cos, sin, True)
