"""Optimiser set-up for MAE pretraining: AdamW without decay on norms, biases, tokens and tables."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

__all__ = ["param_groups", "build_optimizer", "scaled_lr"]

_NO_DECAY_NAMES = ("cls_token", "mask_tokens", "position_embeddings", "pos_embedding")


def param_groups(network: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """Two parameter groups: weights with ``weight_decay``; biases, norms, tokens and position tables without.

    Frozen parameters (e.g. sin-cos tables) are left out.
    """
    decay, no_decay = [], []
    for name, param in network.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or any(key in name for key in _NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(base_lr: float, batch_size: int, world_size: int = 1, accumulation_steps: int = 1, base_batch: int = 256) -> float:
    """The MAE paper's linear scaling rule: ``lr = base_lr * effective_batch / base_batch``.

    ``effective_batch = batch_size * world_size * accumulation_steps``; with ``base_batch=1`` this
    scales a per-GPU learning rate by the world size.
    """
    if base_lr <= 0 or batch_size < 1 or world_size < 1 or accumulation_steps < 1 or base_batch < 1:
        raise ValueError(
            f"scaled_lr needs positive arguments, got base_lr={base_lr}, batch_size={batch_size}, "
            f"world_size={world_size}, accumulation_steps={accumulation_steps}, base_batch={base_batch}."
        )
    return base_lr * batch_size * world_size * accumulation_steps / base_batch


def build_optimizer(
    network: nn.Module | Iterable,
    lr: float = 1.5e-4,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW as in the MAE paper (betas 0.9/0.95, weight decay 0.05), fused on CUDA.

    Args:
        network: the model (its parameters are grouped by :func:`param_groups`).
        lr: learning rate (already scaled, see :func:`scaled_lr`).
        weight_decay: decay of the weight matrices.
        betas: AdamW betas.
        fused: use the fused CUDA kernel; ``None`` turns it on when every parameter is on CUDA.
    """
    groups = param_groups(network, weight_decay) if isinstance(network, nn.Module) else list(network)
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)
