"""Transformer blocks for long 3D token sequences: axial rotary position embeddings (RoPE), SwiGLU
MLPs, LayerScale and stochastic depth, on fused ``scaled_dot_product_attention``.

These are the block options of Primus (Wald et al., arXiv 2503.01835), a pure-ViT 3D segmentation
network with 8^3 patches. :class:`EncoderBlock` keeps the parameter names and layouts of MONAI's
``TransformerBlock`` (``norm1``, ``attn.qkv``, ``attn.out_proj``, ``norm2``, ``mlp.linear1``,
``mlp.linear2``), so with the default options (GELU MLP, no LayerScale) a MONAI block's weights
load into it and give the same output; the options add ``ls1.gamma`` / ``ls2.gamma`` (LayerScale)
and double ``mlp.linear1`` (SwiGLU's gate and value halves).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.layers import DropPath
from monai.utils import look_up_option
from torch.utils.checkpoint import checkpoint

from monai_mae.utils import is_compiling

__all__ = [
    "MLP_TYPES",
    "Rope",
    "AxialRoPE",
    "apply_rope",
    "apply_rope_qkv",
    "grid_coordinates",
    "RoPEAttention",
    "SwiGLU",
    "GeluMLP",
    "LayerScale",
    "EncoderBlock",
    "build_blocks",
    "mlp_and_layer_scales",
    "run_blocks",
]

#: Supported values of ``mlp_type``.
MLP_TYPES = ("gelu", "swiglu")

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (B or 1, 1, M, R)


def grid_coordinates(grid: Sequence[int], indices: torch.Tensor | None = None, device: torch.device | None = None) -> torch.Tensor:
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


class RoPEAttention(nn.Module):
    """Multi-head self-attention on fused SDPA with optional rotary embeddings on queries and keys.

    Same parameters and layouts as MONAI's ``SABlock`` with ``use_combined_linear=True``:
    ``qkv`` output channels ordered (q/k/v, head, channel), ``out_proj`` input (head, channel).
    """

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool = False, dropout_rate: float = 0.0) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.drop_output = nn.Dropout(dropout_rate)
        self.dropout_rate = dropout_rate

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """``(B, M, D)`` -> ``(B, M, D)``."""
        batch, n_tokens, width = x.shape
        qkv = self.qkv(x).view(batch, n_tokens, 3, self.num_heads, self.head_dim)  # (B, M, 3, H, hd)
        if rope is not None:
            q, k, v = apply_rope_qkv(qkv, rope)  # each (B, H, M, hd), contiguous
        else:
            # token-major views: SDPA reads them in place (and writes its output token-major, so merging the
            # heads below is a view); the backward pass stacks the three gradients in one copy
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        dropout = self.dropout_rate if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, H, M, hd)
        return self.drop_output(self.out_proj(out.transpose(1, 2).reshape(batch, n_tokens, width)))


class SwiGLU(nn.Module):
    """``linear2(silu(a) * b)`` with ``a, b = linear1(x).chunk(2)``: ``mlp_dim`` hidden units, ``2 * mlp_dim`` in ``linear1``."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, 2 * mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.drop1 = nn.Dropout(dropout_rate)
        self.drop2 = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the two halves of linear1 as two products (views of its weight): the same values as chunking one
        # product, without concatenating the halves' gradients into a (M, 2 * mlp_dim) copy in the backward pass
        weight, bias = self.linear1.weight, self.linear1.bias
        half = weight.shape[0] // 2
        gate = F.linear(x, weight[:half], bias[:half])
        value = F.linear(x, weight[half:], bias[half:])
        return self.drop2(self.linear2(self.drop1(F.silu(gate) * value)))


class GeluMLP(nn.Module):
    """MONAI's ``MLPBlock`` ("vit" dropout): ``linear2(gelu(linear1(x)))``, same parameter names."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.drop1 = nn.Dropout(dropout_rate)
        self.drop2 = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(F.gelu(self.linear1(x)))))


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma`` (Touvron et al., 2021), initialised to ``init``."""

    def __init__(self, hidden_size: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((hidden_size,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(ls1(attn(norm1(x), rope)))``, then the MLP likewise.

    Args:
        hidden_size: token width.
        mlp_dim: MLP hidden units.
        num_heads: attention heads.
        dropout_rate: dropout after attention and in the MLP. Defaults to 0.
        qkv_bias: bias on the qkv projection. Defaults to False.
        mlp_type: ``"gelu"`` (MONAI's MLP) or ``"swiglu"``. Defaults to ``"gelu"``.
        layer_scale_init: LayerScale's initial value, None for none. Defaults to None.
        drop_path: stochastic-depth probability of both branches. Defaults to 0.
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        mlp_type: str = "gelu",
        layer_scale_init: float | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = RoPEAttention(hidden_size, num_heads, qkv_bias, dropout_rate)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp, self.ls1, self.ls2 = mlp_and_layer_scales(hidden_size, mlp_dim, dropout_rate, mlp_type, layer_scale_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """``(B, M, D)`` -> ``(B, M, D)``; ``rope`` from :class:`AxialRoPE` for the same tokens."""
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def mlp_and_layer_scales(
    hidden_size: int, mlp_dim: int, dropout_rate: float, mlp_type: str, layer_scale_init: float | None
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """A block's MLP (``"gelu"``: MONAI's MLP, ``"swiglu"``) and its two LayerScales (``nn.Identity`` when
    ``layer_scale_init`` is None): ``(mlp, ls1, ls2)``, shared by the self- and cross-attention blocks."""
    mlp_class = {"gelu": GeluMLP, "swiglu": SwiGLU}[look_up_option(mlp_type, MLP_TYPES)]
    scale = (lambda: LayerScale(hidden_size, layer_scale_init)) if layer_scale_init is not None else nn.Identity
    return mlp_class(hidden_size, mlp_dim, dropout_rate), scale(), scale()


def _check_options(mlp_type: str, layer_scale_init: float | None, drop_path_rate: float) -> None:
    look_up_option(mlp_type, MLP_TYPES)
    if layer_scale_init is not None and not (isinstance(layer_scale_init, (int, float)) and layer_scale_init > 0):
        raise ValueError(f"layer_scale_init must be None or a positive number, got {layer_scale_init!r}.")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")


def build_blocks(
    num_layers: int,
    hidden_size: int,
    mlp_dim: int,
    num_heads: int,
    dropout_rate: float = 0.0,
    qkv_bias: bool = False,
    *,
    mlp_type: str = "gelu",
    layer_scale_init: float | None = None,
    drop_path_rate: float = 0.0,
    monai_blocks: bool = False,
    save_attn: bool = False,
    use_flash_attention: bool = True,
) -> nn.ModuleList:
    """``num_layers`` blocks; stochastic depth rises linearly from 0 to ``drop_path_rate`` over them.

    With ``monai_blocks`` (only valid without the options) MONAI's ``TransformerBlock`` is used, as
    :class:`~monai_mae.networks.mae.MAEViT` does by default for MONAI compatibility.

    Raises:
        ValueError: for an unknown ``mlp_type``, a non-positive ``layer_scale_init``, a
            ``drop_path_rate`` outside [0, 1), or options combined with ``monai_blocks``.
    """
    _check_options(mlp_type, layer_scale_init, drop_path_rate)
    if monai_blocks:
        if mlp_type != "gelu" or layer_scale_init is not None or drop_path_rate > 0:
            raise ValueError("mlp_type, layer_scale_init and drop_path_rate need EncoderBlock, not MONAI's TransformerBlock.")
        return nn.ModuleList(
            TransformerBlock(
                hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias, save_attn, use_flash_attention=use_flash_attention
            )
            for _ in range(num_layers)
        )
    rates = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]
    return nn.ModuleList(
        EncoderBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias, mlp_type, layer_scale_init, rate)
        for rate in rates
    )


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    rope: Rope | None = None,
    checkpointing: bool = False,
    *,
    context: tuple[Any, ...] = (),
) -> torch.Tensor:
    """Apply ``blocks`` in turn (``rope`` passed to each :class:`EncoderBlock`), optionally recomputing
    activations in the backward pass (``torch.utils.checkpoint``) to save memory.

    ``context`` (keyword-only) are further arguments after ``x`` for blocks that take them, e.g. the
    memory and rotary tables of :class:`~monai_mae.networks.cross_decoder.CrossDecoderBlock`; they come
    before ``rope`` when both are given.
    """
    for block in blocks:
        args = (x, *context) if rope is None else (x, *context, rope)
        if checkpointing and block.training and torch.is_grad_enabled():
            x = checkpoint(block, *args, use_reentrant=False)
        else:
            x = block(*args)
    return x
