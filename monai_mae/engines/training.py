"""Training-loop handlers: a non-finite-loss guard, gradient clipping, learning-rate logging and a
rank-0 TensorBoard writer.

Every handler is a plain object with ``attach(engine)``, so bundles list them in ``train_handlers``
like MONAI's own handlers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from monai_mae.engines.checkpoint import list_checkpoints
from monai_mae.engines.distributed import optimizer_steps_now
from monai_mae.utils import is_distributed, is_main_process

__all__ = [
    "rank_zero_summary_writer",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "GradientClipping",
    "LearningRateLogger",
]


class _NullSummaryWriter:
    """Stands in for a ``SummaryWriter`` on ranks that must not write: every method does nothing."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def rank_zero_summary_writer(log_dir: str | os.PathLike, **kwargs: Any) -> Any:
    """A TensorBoard ``SummaryWriter`` on rank 0 (or without ``torch.distributed``), a no-op stand-in elsewhere.

    A ``SummaryWriter`` creates its event file when it is built, and MONAI's
    ``TensorBoardStatsHandler`` builds its own (under ``./runs``) when given none, so in a
    multi-process run the other ranks get an object with the same methods that writes nothing.
    Call it after ``init_process_group``.

    Args:
        log_dir: the TensorBoard folder.
        kwargs: more ``SummaryWriter`` arguments.
    """
    if not is_main_process():
        return _NullSummaryWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), **kwargs)


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite."""


class NonFiniteLossGuard:
    """Stop training on a NaN/Inf loss *before* the backward pass, so no weight is corrupted.

    Raises :class:`NonFiniteLossError` naming the epoch and iteration and, when a checkpoint folder
    is given, the last good checkpoint there, from which the same command resumes. In a
    ``torch.distributed`` run the ranks agree first (one all-reduce of a flag per rank and
    iteration), so every rank stops at the same iteration instead of the healthy ones waiting in
    the gradient all-reduce for the one that stopped; the message names the ranks that saw it.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike | None = None, loss_key: str = CommonKeys.LOSS) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.loss_key = loss_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = engine.state.output[self.loss_key]
        finite = torch.isfinite(loss.detach()).all()
        ranks = ""
        if is_distributed() and torch.distributed.get_world_size() > 1:
            flags = torch.zeros(torch.distributed.get_world_size(), device=loss.device)
            flags[torch.distributed.get_rank()] = (~finite).float()
            torch.distributed.all_reduce(flags)
            bad = [rank for rank, flag in enumerate(flags.tolist()) if flag > 0]
            if not bad:
                return
            ranks = f" on rank(s) {bad}"
        elif bool(finite):
            return
        where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}{ranks}"
        last = list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir is not None else []
        keep = f" The last good checkpoint is {last[0][1]}; run the same command to resume from it." if last else ""
        value = f"{loss.item()}" + (" on this rank" if ranks else "")
        raise NonFiniteLossError(f"non-finite training loss ({value}) at {where}; training stopped.{keep}")


class GradientClipping:
    """Clip the global gradient norm after each backward pass (``IterationEvents.BACKWARD_COMPLETED``).

    With MONAI's AMP grad scaler the gradients are unscaled first. With gradient accumulation the
    clip happens on the iterations where the optimizer steps.
    """

    def __init__(self, max_norm: float = 3.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}.")
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not optimizer_steps_now(engine):
            return
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


class LearningRateLogger:
    """Write the optimizer's learning rate (first group) to TensorBoard every ``interval`` iterations."""

    def __init__(
        self, summary_writer: Any, optimizer: torch.optim.Optimizer, interval: int = 10, tag: str = "lr"
    ) -> None:
        self.summary_writer = summary_writer
        self.optimizer = optimizer
        self.interval = max(int(interval), 1)
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if is_main_process():
            self.summary_writer.add_scalar(self.tag, self.optimizer.param_groups[0]["lr"], engine.state.iteration)
