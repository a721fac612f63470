"""Multi-head self-attention on fused ``scaled_dot_product_attention``, with optional rotary embeddings.

:class:`RoPEAttention` holds the parameters of MONAI's ``SABlock`` (``use_combined_linear=True``) under
the same names, so MONAI's weights load into it and give the same output. Two options of EVA-02 / Primus
add parameters: ``qkv_bias="qv"`` (biases on queries and values only) and ``norm`` (a LayerNorm over the
merged heads before the output projection).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_mae.networks.rope import Rope, apply_rope_qkv

__all__ = ["RoPEAttention", "QKV_BIAS_MODES", "check_heads", "check_qkv_bias"]

#: Values of ``qkv_bias``: no bias, a bias on queries, keys and values, or on queries and values only.
QKV_BIAS_MODES = (False, True, "qv")


def check_heads(width: int, heads: int, prefix: str = "") -> None:
    """Raise a ``ValueError`` naming ``{prefix}hidden_size`` and ``{prefix}num_heads`` unless ``heads``
    divides ``width``."""
    if width % heads:
        raise ValueError(f"{prefix}hidden_size={width} must be divisible by {prefix}num_heads={heads}.")


def check_qkv_bias(qkv_bias: bool | str) -> bool | str:
    """``qkv_bias`` itself when it is one of :data:`QKV_BIAS_MODES`.

    Raises:
        ValueError: for any other value (the message lists the valid ones).
    """
    if not any(qkv_bias is mode or (isinstance(mode, str) and qkv_bias == mode) for mode in QKV_BIAS_MODES):
        raise ValueError(f"qkv_bias must be False, True or 'qv' (queries and values only), got {qkv_bias!r}.")
    return qkv_bias


class RoPEAttention(nn.Module):
    """Multi-head self-attention on fused SDPA with optional rotary embeddings on queries and keys.

    Same parameters and layouts as MONAI's ``SABlock`` with ``use_combined_linear=True``:
    ``qkv`` output channels ordered (q/k/v, head, channel), ``out_proj`` input (head, channel).

    Args:
        hidden_size: token width ``D``.
        num_heads: heads (dividing ``hidden_size``).
        qkv_bias: ``False`` (default), ``True`` (``qkv.bias``, ``3 * D`` entries) or ``"qv"``: biases on the
            queries and values only, as EVA-02 / Primus: ``qkv`` has no bias, ``q_bias`` and ``v_bias`` (``D``
            each) hold them, and the keys' part is a constant zero (no parameter, nothing in the state dict).
        dropout_rate: dropout after the output projection and on the attention weights in training.
        norm: keyword-only. A LayerNorm over the merged heads before ``out_proj`` (``norm.*``; EVA's
            ``scale_attn_inner``, on in Primus). Defaults to False.

    Raises:
        ValueError: when ``num_heads`` does not divide ``hidden_size`` or for an invalid ``qkv_bias``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        qkv_bias: bool | str = False,
        dropout_rate: float = 0.0,
        *,
        norm: bool = False,
    ) -> None:
        super().__init__()
        check_heads(hidden_size, num_heads)
        check_qkv_bias(qkv_bias)
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias is True)
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(hidden_size))
            self.v_bias = nn.Parameter(torch.zeros(hidden_size))
        else:
            self.q_bias = self.v_bias = None
        self.norm = nn.LayerNorm(hidden_size) if norm else nn.Identity()
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.drop_output = nn.Dropout(dropout_rate)
        self.dropout_rate = dropout_rate

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The fused projection ``(B, M, D)`` -> ``(B, M, 3 * D)``, channels (q/k/v, head, channel)."""
        if self.q_bias is None:
            return self.qkv(x)
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # keys: no bias
        return F.linear(x, self.qkv.weight, bias)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """``(B, M, D)`` -> ``(B, M, D)``."""
        batch, n_tokens, width = x.shape
        qkv = self.project_qkv(x).view(batch, n_tokens, 3, self.num_heads, self.head_dim)  # (B, M, 3, H, hd)
        if rope is not None:
            q, k, v = apply_rope_qkv(qkv, rope)  # each (B, H, M, hd), contiguous
        else:
            # token-major views: SDPA reads them in place (and writes its output token-major, so merging the
            # heads below is a view); the backward pass stacks the three gradients in one copy
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        dropout = self.dropout_rate if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, H, M, hd)
        merged = self.norm(out.transpose(1, 2).reshape(batch, n_tokens, width))  # (B, M, D), heads merged
        return self.drop_output(self.out_proj(merged))
