"""Cross-attention MAE decoder blocks for long sequences, after CrossMAE (Fu et al., 2024, "Rethinking
Patch Dependence for Masked Autoencoders", arXiv 2401.14391).

The queries are mask tokens (plus position) for the patches to reconstruct; the keys and values are
the encoder's visible tokens projected to the decoder width. A block is

    x = x + ls1(attn(norm1(x), norm_kv(memory)))
    x = x + ls2(mlp(norm2(x)))

and the queries never attend to each other (CrossMAE found self-attention among them unnecessary).
Each prediction therefore depends on its own position and the visible tokens only, so any subset of
the masked patches can be reconstructed, and attention costs ``O(N_pred * N_visible)`` instead of the
self-attention decoder's ``O(N^2)``. Every block reads the same memory (the encoder's final output;
CrossMAE's mixing of features from several encoder layers is not done here).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_mae.networks.attention import check_heads
from monai_mae.networks.blocks import mlp_and_layer_scales
from monai_mae.networks.rope import Rope, apply_rope

__all__ = ["CrossAttention", "CrossDecoderBlock", "build_cross_blocks"]


class CrossAttention(nn.Module):
    """Multi-head attention of queries to a memory on fused SDPA, with optional rotary embeddings.

    Parameters: ``q`` (``D -> D``), ``kv`` (``D -> 2 D``, output channels ordered (k/v, head, channel)),
    ``out_proj`` (``D -> D``).

    Args:
        hidden_size: token width ``D``.
        num_heads: attention heads.
        qkv_bias: bias on the ``q`` and ``kv`` projections. Defaults to False.
        dropout_rate: attention dropout (training only) and dropout after ``out_proj``. Defaults to 0.

    Raises:
        ValueError: when ``hidden_size`` is not divisible by ``num_heads``.
    """

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool = False, dropout_rate: float = 0.0) -> None:
        super().__init__()
        check_heads(hidden_size, num_heads)
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.drop_output = nn.Dropout(dropout_rate)
        self.dropout_rate = dropout_rate

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, rope_q: Rope | None = None, rope_kv: Rope | None = None
    ) -> torch.Tensor:
        """Attend from ``x`` to ``memory``.

        Args:
            x: ``(B, M, D)`` queries.
            memory: ``(B, K, D)`` keys and values.
            rope_q: ``(cos, sin)`` for the ``M`` queries (each ``(B or 1, 1, M, R)``), or None.
            rope_kv: ``(cos, sin)`` for the ``K`` keys, or None.

        Returns:
            ``(B, M, D)``.
        """
        batch, n_queries, width = x.shape
        q = self.q(x).view(batch, n_queries, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, M, hd)
        kv = self.kv(memory).view(batch, memory.shape[1], 2, self.num_heads, self.head_dim)  # (B, K, 2, H, hd)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # each (B, H, K, hd)
        if rope_q is not None:
            q = apply_rope(q, rope_q)
        if rope_kv is not None:
            k = apply_rope(k, rope_kv)
        dropout = self.dropout_rate if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, H, M, hd)
        return self.drop_output(self.out_proj(out.transpose(1, 2).reshape(batch, n_queries, width)))


class CrossDecoderBlock(nn.Module):
    """Pre-norm cross-attention block: the queries attend to the memory, then an MLP; no self-attention.

    Args:
        hidden_size: token width.
        mlp_dim: MLP hidden units.
        num_heads: attention heads.
        dropout_rate: dropout in attention and MLP. Defaults to 0.
        qkv_bias: bias on the query and key/value projections. Defaults to False.
        mlp_type: ``"gelu"`` (MONAI's MLP) or ``"swiglu"``. Defaults to ``"gelu"``.
        layer_scale_init: LayerScale's initial value, None for none. Defaults to None.
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
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm_kv = nn.LayerNorm(hidden_size)
        self.attn = CrossAttention(hidden_size, num_heads, qkv_bias, dropout_rate)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp, self.ls1, self.ls2 = mlp_and_layer_scales(
            hidden_size, mlp_dim, dropout_rate, mlp_type, layer_scale_init
        )

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, rope_q: Rope | None = None, rope_kv: Rope | None = None
    ) -> torch.Tensor:
        """``x (B, M, D)``, ``memory (B, K, D)`` -> ``(B, M, D)``; ``rope_*`` as in :class:`CrossAttention`."""
        x = x + self.ls1(self.attn(self.norm1(x), self.norm_kv(memory), rope_q, rope_kv))
        return x + self.ls2(self.mlp(self.norm2(x)))


def build_cross_blocks(
    num_layers: int,
    hidden_size: int,
    mlp_dim: int,
    num_heads: int,
    dropout_rate: float = 0.0,
    qkv_bias: bool = False,
    *,
    mlp_type: str = "gelu",
    layer_scale_init: float | None = None,
) -> nn.ModuleList:
    """``num_layers`` :class:`CrossDecoderBlock` s."""
    return nn.ModuleList(
        CrossDecoderBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias, mlp_type, layer_scale_init)
        for _ in range(num_layers)
    )
