"""Optimiser set-up for MAE pretraining: AdamW without decay on norms, biases, tokens and tables."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from monai_mae.utils import no_weight_decay

__all__ = ["param_groups", "build_optimizer", "fused_adamw_supported", "scaled_lr"]

_TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


def param_groups(network: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """Two parameter groups: weights with ``weight_decay``; biases, norms, tokens and position tables without.

    Frozen parameters (e.g. sin-cos tables) are left out.
    """
    decay, no_decay = [], []
    for name, param in network.named_parameters():
        if not param.requires_grad:
            continue
        if no_weight_decay(name, param):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(
    base_lr: float, batch_size: int, world_size: int = 1, accumulation_steps: int = 1, base_batch: int = 256
) -> float:
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
    """AdamW as in the MAE paper (betas 0.9/0.95, weight decay 0.05), fused where torch has the kernel.

    Build it after moving the network to its device: the fused kernel is chosen from the
    parameters' device. On CPU the fused kernel (torch >= 2.4) replaces a Python loop of about ten
    elementwise ops per tensor; for ViT-B that loop took 30-50% of a CPU training step
    (``benchmarks/bench_vs_monai.py``).

    Args:
        network: the model (its parameters are grouped by :func:`param_groups`).
        lr: learning rate (already scaled, see :func:`scaled_lr`).
        weight_decay: decay of the weight matrices.
        betas: AdamW betas.
        fused: use torch's fused AdamW kernel; ``None`` turns it on when every parameter is on
            CUDA, or on the CPU with torch >= 2.4.
    """
    groups = param_groups(network, weight_decay) if isinstance(network, nn.Module) else list(network)
    if fused is None:
        fused = fused_adamw_supported([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can update ``params``: all floating point and all on CUDA,
    or all on the CPU with torch >= 2.4 (the first release with a CPU kernel)."""
    params = list(params)
    if not params or not all(p.is_floating_point() for p in params):
        return False
    if all(p.is_cuda for p in params):
        return True
    return all(p.device.type == "cpu" for p in params) and _TORCH_VERSION >= (2, 4)
