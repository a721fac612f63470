"""The transformer block of the encoders and the self-attention MAE decoder, and how a stack of them is
built and run.

:class:`EncoderBlock` keeps the parameter names and layouts of MONAI's ``TransformerBlock``
(``norm1``, ``attn.qkv``, ``attn.out_proj``, ``norm2``, ``mlp.linear1``, ``mlp.linear2``), so with the
default options (GELU MLP, no LayerScale) a MONAI block's weights load into it and give the same
output; the options add ``ls1.gamma`` / ``ls2.gamma`` (LayerScale), double ``mlp.linear1``
(SwiGLU's gate and value halves), add ``attn.norm.*`` (a LayerNorm over the merged heads before the output
projection), ``mlp.norm.*`` (a LayerNorm before ``mlp.linear2``), and replace ``attn.qkv.bias`` by
``attn.q_bias`` / ``attn.v_bias`` (``qkv_bias="qv"``: no key bias). With all of them on, a block computes
what a block of Primus (Wald et al., arXiv 2503.01835; timm's ``EvaBlock``) computes, a pure-ViT 3D
segmentation network with 8^3 patches. The parts live beside this module:
attention in :mod:`~monai_mae.networks.attention`, rotary embeddings in :mod:`~monai_mae.networks.rope`,
the MLPs in :mod:`~monai_mae.networks.mlp`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.layers import DropPath
from monai.utils import look_up_option
from torch.utils.checkpoint import checkpoint

from monai_mae.networks.attention import RoPEAttention, check_qkv_bias
from monai_mae.networks.mlp import MLP_TYPES, build_mlp
from monai_mae.networks.rope import Rope

__all__ = ["LayerScale", "EncoderBlock", "build_blocks", "mlp_and_layer_scales", "run_blocks"]


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
        qkv_bias: bias on the qkv projection: False, True or ``"qv"`` (queries and values only; see
            :class:`~monai_mae.networks.attention.RoPEAttention`). Defaults to False.
        mlp_type: ``"gelu"`` (MONAI's MLP) or ``"swiglu"``. Defaults to ``"gelu"``.
        layer_scale_init: LayerScale's initial value, None for none. Defaults to None.
        drop_path: stochastic-depth probability of both branches. Defaults to 0.
        attn_norm: keyword-only. LayerNorm over the merged heads before the attention's output projection
            (``attn.norm``). Defaults to False.
        mlp_norm: keyword-only. LayerNorm over the MLP's hidden units before ``linear2`` (``mlp.norm``).
            Defaults to False.
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        dropout_rate: float = 0.0,
        qkv_bias: bool | str = False,
        mlp_type: str = "gelu",
        layer_scale_init: float | None = None,
        drop_path: float = 0.0,
        *,
        attn_norm: bool = False,
        mlp_norm: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = RoPEAttention(hidden_size, num_heads, qkv_bias, dropout_rate, norm=attn_norm)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp, self.ls1, self.ls2 = mlp_and_layer_scales(
            hidden_size, mlp_dim, dropout_rate, mlp_type, layer_scale_init, mlp_norm=mlp_norm
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """``(B, M, D)`` -> ``(B, M, D)``; ``rope`` from :class:`AxialRoPE` for the same tokens."""
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def mlp_and_layer_scales(
    hidden_size: int,
    mlp_dim: int,
    dropout_rate: float,
    mlp_type: str,
    layer_scale_init: float | None,
    *,
    mlp_norm: bool = False,
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """A block's MLP (``"gelu"``: MONAI's MLP, ``"swiglu"``; ``mlp_norm``: with the inner LayerNorm) and its two
    LayerScales (``nn.Identity`` when ``layer_scale_init`` is None): ``(mlp, ls1, ls2)``, shared by the self- and
    cross-attention blocks."""
    scale = (lambda: LayerScale(hidden_size, layer_scale_init)) if layer_scale_init is not None else nn.Identity
    return build_mlp(hidden_size, mlp_dim, dropout_rate, mlp_type, norm=mlp_norm), scale(), scale()


def _check_options(mlp_type: str, layer_scale_init: float | None, drop_path_rate: float, qkv_bias: bool | str) -> None:
    look_up_option(mlp_type, MLP_TYPES)
    check_qkv_bias(qkv_bias)
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
    qkv_bias: bool | str = False,
    *,
    mlp_type: str = "gelu",
    layer_scale_init: float | None = None,
    drop_path_rate: float = 0.0,
    attn_norm: bool = False,
    mlp_norm: bool = False,
    monai_blocks: bool = False,
    save_attn: bool = False,
    use_flash_attention: bool = True,
) -> nn.ModuleList:
    """``num_layers`` blocks; stochastic depth rises linearly from 0 to ``drop_path_rate`` over them.

    With ``monai_blocks`` (only valid without the options) MONAI's ``TransformerBlock`` is used, as
    :class:`~monai_mae.networks.mae.MAEViT` does by default for MONAI compatibility; their unused
    cross-attention norms are frozen. ``qkv_bias="qv"``, ``attn_norm`` and ``mlp_norm`` are the options of
    :class:`EncoderBlock`.

    Raises:
        ValueError: for an unknown ``mlp_type`` or ``qkv_bias``, a non-positive ``layer_scale_init``, a
            ``drop_path_rate`` outside [0, 1), or options combined with ``monai_blocks``.
    """
    _check_options(mlp_type, layer_scale_init, drop_path_rate, qkv_bias)
    if monai_blocks:
        options = mlp_type != "gelu" or layer_scale_init is not None or drop_path_rate > 0
        if options or qkv_bias == "qv" or attn_norm or mlp_norm:
            raise ValueError(
                "mlp_type, layer_scale_init, drop_path_rate, qkv_bias='qv', attn_norm and mlp_norm need EncoderBlock, "
                "not MONAI's TransformerBlock."
            )
        blocks = nn.ModuleList(
            TransformerBlock(
                hidden_size,
                mlp_dim,
                num_heads,
                dropout_rate,
                qkv_bias,
                save_attn,
                use_flash_attention=use_flash_attention,
            )
            for _ in range(num_layers)
        )
        # MONAI's TransformerBlock always builds a cross-attention norm; without cross-attention it is never used,
        # so freeze it (kept in the state dict for MONAI compatibility; DDP then needs no unused-parameter scan)
        for block in blocks:
            if hasattr(block, "norm_cross_attn"):  # (MONAI versions that have it)
                block.norm_cross_attn.requires_grad_(False)
        return blocks
    rates = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]
    return nn.ModuleList(
        EncoderBlock(
            hidden_size,
            mlp_dim,
            num_heads,
            dropout_rate,
            qkv_bias,
            mlp_type,
            layer_scale_init,
            rate,
            attn_norm=attn_norm,
            mlp_norm=mlp_norm,
        )
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
