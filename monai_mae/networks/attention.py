"""Multi-head self-attention on fused ``scaled_dot_product_attention``, with optional rotary embeddings.

:class:`RoPEAttention` holds the parameters of MONAI's ``SABlock`` (``use_combined_linear=True``) under
the same names, so MONAI's weights load into it and give the same output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_mae.networks.rope import Rope, apply_rope_qkv

__all__ = ["RoPEAttention", "check_heads"]


def check_heads(width: int, heads: int, prefix: str = "") -> None:
    """Raise a ``ValueError`` naming ``{prefix}hidden_size`` and ``{prefix}num_heads`` unless ``heads``
    divides ``width``."""
    if width % heads:
        raise ValueError(f"{prefix}hidden_size={width} must be divisible by {prefix}num_heads={heads}.")


class RoPEAttention(nn.Module):
    """Multi-head self-attention on fused SDPA with optional rotary embeddings on queries and keys.

    Same parameters and layouts as MONAI's ``SABlock`` with ``use_combined_linear=True``:
    ``qkv`` output channels ordered (q/k/v, head, channel), ``out_proj`` input (head, channel).
    """

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool = False, dropout_rate: float = 0.0) -> None:
        super().__init__()
        check_heads(hidden_size, num_heads)
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
