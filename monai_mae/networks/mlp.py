"""The MLPs of a transformer block: MONAI's GELU MLP and SwiGLU, chosen by ``mlp_type``.

Both keep MONAI's ``MLPBlock`` parameter names (``linear1``, ``linear2``); SwiGLU's ``linear1`` holds
the gate and value halves, ``2 * mlp_dim`` outputs. ``norm=True`` adds a LayerNorm over the ``mlp_dim``
hidden units before ``linear2`` (``norm.*``; EVA-02's ``scale_mlp``, always on in Primus).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import look_up_option

__all__ = ["MLP_TYPES", "GeluMLP", "SwiGLU", "build_mlp"]

#: Supported values of ``mlp_type``.
MLP_TYPES = ("gelu", "swiglu")


class SwiGLU(nn.Module):
    """``linear2(norm(silu(a) * b))`` with ``a, b = linear1(x).chunk(2)`` (gate first): ``mlp_dim`` hidden units,
    ``2 * mlp_dim`` outputs in ``linear1``; ``norm`` is a LayerNorm over ``mlp_dim`` with ``norm=True``, else
    the identity."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0, *, norm: bool = False) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, 2 * mlp_dim)
        self.norm = nn.LayerNorm(mlp_dim) if norm else nn.Identity()
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
        return self.drop2(self.linear2(self.norm(self.drop1(F.silu(gate) * value))))


class GeluMLP(nn.Module):
    """MONAI's ``MLPBlock`` ("vit" dropout): ``linear2(gelu(linear1(x)))``, same parameter names; ``norm=True``
    adds a LayerNorm over the ``mlp_dim`` hidden units before ``linear2``."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0, *, norm: bool = False) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.norm = nn.LayerNorm(mlp_dim) if norm else nn.Identity()
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.drop1 = nn.Dropout(dropout_rate)
        self.drop2 = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.norm(self.drop1(F.gelu(self.linear1(x))))))


def build_mlp(
    hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0, mlp_type: str = "gelu", *, norm: bool = False
) -> nn.Module:
    """The MLP named by ``mlp_type`` (one of :data:`MLP_TYPES`): ``(B, M, hidden_size) -> (B, M, hidden_size)``;
    ``norm`` adds the inner LayerNorm (``norm.*``) before ``linear2``.

    Raises:
        ValueError: for an unknown ``mlp_type``.
    """
    mlp_class = {"gelu": GeluMLP, "swiglu": SwiGLU}[look_up_option(mlp_type, MLP_TYPES)]
    return mlp_class(hidden_size, mlp_dim, dropout_rate, norm=norm)
