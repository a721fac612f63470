"""Crash-safe checkpointing for long runs: durable atomic writes, rotating epoch checkpoints, automatic
resume, and the best and final weights.

Every handler is a plain object with ``attach(engine)``, so bundles list them in ``train_handlers``
or ``val_handlers`` like MONAI's own handlers.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from monai_mae.model_file import save_model
from monai_mae.utils import atomic_write, is_main_process, unwrap

__all__ = [
    "atomic_save",
    "list_checkpoints",
    "EpochCheckpointer",
    "AutoResume",
    "BestModelSaver",
    "FinalModelSaver",
]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")
# temporary files of a write cut short by a kill: ours (atomic_write) and those of Ignite's atomic
# DiskSaver (NamedTemporaryFile defaults), written by earlier versions
_TMP_PATTERNS = (re.compile(r"^\.checkpoint_epoch=\d+\.pt\..+\.tmp$"), re.compile(r"^tmp[a-z0-9_]{8}$"))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`monai_mae.utils.atomic_write`: a crash or power loss never leaves a half file."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the ``checkpoint_epoch=N.pt`` files in a folder, newest first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


class _DurableDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` writing through :func:`atomic_write` (fsync of the file and the folder)."""

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        atomic_write(path, lambda handle: func(checkpoint, handle, **self.kwargs))


class EpochCheckpointer:
    """Save ``save_dict`` (network, optimizer, scheduler, trainer, ...) atomically every ``interval`` epochs.

    Files are ``{save_dir}/checkpoint_epoch=N.pt``, the newest ``n_saved`` are kept, and only rank 0
    writes. Writing goes through :func:`monai_mae.utils.atomic_write` (temporary file, fsync, rename,
    fsync of the folder), so a crash or power loss mid-write leaves the previous checkpoint intact.

    After a restart (e.g. a resume by :class:`AutoResume`), the first save also takes over the
    folder: checkpoints of earlier epochs are counted against ``n_saved`` (the oldest beyond it are
    deleted, as the interrupted run would have done), temporary files of a write cut short by a kill
    are deleted, and checkpoints of *later* epochs than the one being saved (left by another run in
    the same folder) are kept but reported with a warning, because :class:`AutoResume` would pick
    them after a crash.

    Args:
        save_dir: folder for the checkpoints.
        save_dict: objects with ``state_dict``; a wrapped network is saved unwrapped.
        n_saved: how many to keep. Defaults to 2.
        interval: every how many epochs. Defaults to 1.

    Raises:
        ValueError: when ``n_saved`` or ``interval`` is below 1.
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping[str, Any], n_saved: int = 2, interval: int = 1):
        if n_saved < 1 or interval < 1:
            raise ValueError(f"n_saved and interval must be >= 1, got {n_saved} and {interval}.")
        self.save_dir = Path(save_dir)
        self.interval = interval
        to_save = {k: unwrap(v) if isinstance(v, nn.Module) else v for k, v in save_dict.items()}
        self.checkpoint = Checkpoint(
            to_save,
            _DurableDiskSaver(str(self.save_dir), require_empty=False, atomic=True, create_dir=True),
            filename_prefix="",
            score_function=lambda engine: engine.state.epoch,
            score_name="epoch",
            filename_pattern="checkpoint_epoch={score}.pt",
            n_saved=n_saved,
        )
        self.n_saved = n_saved
        self._adopted = False
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        stale: list[Path] = []
        if not self._adopted:
            stale = self._adopt_folder(int(engine.state.epoch))
            self._adopted = True
        self.checkpoint(engine)
        for path in stale:  # only once the new checkpoint is on disk
            path.unlink(missing_ok=True)
            self.logger.info(f"EpochCheckpointer: removed {path} (beyond n_saved={self.n_saved}).")

    def _adopt_folder(self, epoch: int) -> list[Path]:
        """Before the first save at ``epoch``: count the checkpoints already in the folder (see the class
        doc), delete leftover temporary files, and return the old checkpoints beyond ``n_saved`` (rank 0)."""
        found = list_checkpoints(self.save_dir)
        later = [path.name for e, path in found if e > epoch]
        if later:
            self.logger.warning(
                f"EpochCheckpointer: {self.save_dir} holds checkpoints of later epochs than {epoch} ({later}), "
                "from another run; AutoResume would resume from them after a crash. Remove them or use another "
                "output_dir."
            )
        earlier = sorted((e, path) for e, path in found if e < epoch)
        room = self.n_saved - 1  # one place is for the checkpoint about to be written
        keep, drop = (earlier[len(earlier) - room :] if room else []), earlier[: len(earlier) - room]
        self.checkpoint.load_state_dict({"_saved": [(e, path.name) for e, path in keep]})
        if not is_main_process() or not self.save_dir.is_dir():
            return []
        for path in self.save_dir.iterdir():
            if any(p.match(path.name) for p in _TMP_PATTERNS) and path.is_file():
                path.unlink(missing_ok=True)
                self.logger.warning(f"EpochCheckpointer: removed {path}, the temporary file of a cut-short write.")
        return [path for _, path in drop]


class AutoResume:
    """Resume from the newest valid checkpoint in ``checkpoint_dir`` when the run starts.

    Candidates are tried newest first; each is read once (``torch.load`` with ``weights_only=True``),
    and one that cannot be read (e.g. truncated by a crash) is skipped with a warning naming it. The
    log says which checkpoint was used, or that none was found and training starts from scratch.

    Args:
        checkpoint_dir: where :class:`EpochCheckpointer` writes.
        load_dict: the same objects as the checkpointer's ``save_dict``.
        map_location: passed to ``torch.load``. Defaults to ``"cpu"``.
        enabled: set False to always start fresh.

    Raises:
        ValueError: at resume, when the checkpoint's epoch is beyond the trainer's ``max_epochs``.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        load_dict: Mapping[str, Any],
        map_location: Any = "cpu",
        enabled: bool = True,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.load_dict = {k: unwrap(v) if isinstance(v, nn.Module) else v for k, v in load_dict.items()}
        self.map_location = map_location
        self.enabled = enabled
        self.resumed_from: Path | None = None
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            return
        for epoch, path in list_checkpoints(self.checkpoint_dir):
            try:
                checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
            except Exception as err:  # a torn or corrupt file: fall back to an older one
                self.logger.warning(f"AutoResume: skipping unreadable checkpoint {path} ({type(err).__name__}: {err}).")
                continue
            max_epochs = engine.state.max_epochs  # the command line's, not the checkpoint's
            Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint)
            if max_epochs is not None and engine.state.epoch > max_epochs:
                raise ValueError(
                    f"AutoResume: checkpoint {path} is at epoch {engine.state.epoch}, beyond max_epochs={max_epochs}; "
                    "raise max_epochs to train further, or use another output_dir to start afresh."
                )
            engine.state.max_epochs = max_epochs
            self.resumed_from = path
            self.logger.info(
                f"AutoResume: resumed from {path} (epoch {epoch}, iteration {engine.state.iteration}); "
                f"training continues to epoch {engine.state.max_epochs}."
            )
            return
        self.logger.info(f"AutoResume: no checkpoint in {self.checkpoint_dir}, starting from scratch.")


def _lower_is_better(cmp_fn: Callable[[float, float], Any]) -> bool | None:
    """Which way an evaluator's ``metric_cmp_fn(current, best)`` ranks values (None if it cannot tell)."""
    try:
        low_wins, high_wins = bool(cmp_fn(0.0, 1.0)), bool(cmp_fn(1.0, 0.0))
    except Exception:
        return None
    return low_wins if low_wins != high_wins else None


class BestModelSaver:
    """Keep the network with the best validation metric at ``path`` (atomic; rank 0 only).

    Attach to the evaluator. The best value so far is part of its ``state_dict``, so putting this
    object in the trainer checkpoint's ``save_dict`` keeps the record across a resume.

    When the evaluator is a MONAI workflow whose key metric is ``metric_name``, this handler and the
    evaluator must rank values the same way: ``attach`` checks the evaluator's ``metric_cmp_fn``
    (e.g. ``lambda current, best: current < best`` for a loss) and raises if it disagrees with
    ``mode``, because the log's "Key metric ... best value" would otherwise name another epoch than
    ``model_best.pt``. After a resume it also hands its record to the evaluator, whose own record
    starts empty in every process.

    Args:
        network: the model to save.
        path: the file, e.g. ``{output_dir}/models/model_best.pt``.
        metric_name: name in ``engine.state.metrics``. Defaults to ``"val_loss"``.
        mode: ``"min"`` (default: lower is better, for a loss) or ``"max"`` (e.g. Dice).
        data_preset: the preprocessing used, written into the self-describing model file
            (:func:`monai_mae.model_file.save_model`) with the network's class and arguments.
        run: facts about the run for the model file (the epoch and metric are added).

    Raises:
        ValueError: for a ``mode`` other than ``"min"``/``"max"``; at ``attach``, when the evaluator ranks
            its key metric ``metric_name`` the other way; when ``metric_name`` is not among the metrics.
    """

    def __init__(
        self,
        network: nn.Module,
        path: str | os.PathLike,
        metric_name: str = "val_loss",
        mode: str = "min",
        data_preset: Mapping[str, Any] | None = None,
        run: Mapping[str, Any] | None = None,
    ):
        if mode not in ("min", "max"):
            raise ValueError(f"BestModelSaver: mode must be 'min' or 'max', got {mode!r}.")
        self.network = network
        self.path = Path(path)
        self.metric_name = metric_name
        self.mode = mode
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = 0
        self.data_preset, self.run = data_preset, dict(run or {})
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        cmp_fn = getattr(engine, "metric_cmp_fn", None)
        if cmp_fn is not None and getattr(engine.state, "key_metric_name", None) == self.metric_name:
            lower = _lower_is_better(cmp_fn)
            if lower is not None and lower != (self.mode == "min"):
                wanted = "current < best" if self.mode == "min" else "current > best"
                raise ValueError(
                    f"BestModelSaver(mode={self.mode!r}): the evaluator ranks its key metric '{self.metric_name}' "
                    f"{'lower' if lower else 'higher'}-is-better (metric_cmp_fn); set the evaluator's metric_cmp_fn "
                    f"to 'lambda current, best: {wanted}' so the logged best and {self.path.name} agree."
                )
        engine.add_event_handler(Events.STARTED, self._share_record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _share_record(self, engine: Engine) -> None:
        """Seed a MONAI evaluator's best metric with the record restored from a checkpoint."""
        state = engine.state
        if (
            self.best_epoch > 0
            and getattr(state, "key_metric_name", None) == self.metric_name
            and getattr(state, "best_metric_epoch", None) == -1
        ):
            state.best_metric, state.best_metric_epoch = self.best, self.best_epoch

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])

    def __call__(self, engine: Engine) -> None:
        if self.metric_name not in engine.state.metrics:
            raise ValueError(f"BestModelSaver: metric '{self.metric_name}' not in {sorted(engine.state.metrics)}.")
        value = float(engine.state.metrics[self.metric_name])
        better = value < self.best if self.mode == "min" else value > self.best
        if not (better and math.isfinite(value)):
            return
        self.best, self.best_epoch = value, int(engine.state.epoch)
        if is_main_process():
            run = {**self.run, "epoch": self.best_epoch, self.metric_name: value}
            save_model(self.network, self.path, data_preset=self.data_preset, run=run)
            self.logger.info(
                f"BestModelSaver: {self.metric_name}={value:.6f} at epoch {self.best_epoch}, saved {self.path}."
            )


class FinalModelSaver:
    """Write the network to ``path`` (atomic; rank 0 only) when training completes.

    The file is self-describing (:func:`monai_mae.model_file.save_model`): the weights under
    ``"network"`` plus the network's class and constructor arguments, ``data_preset`` and ``run``.
    Nothing is written when the run was terminated early or a weight is not finite.
    """

    def __init__(
        self,
        network: nn.Module,
        path: str | os.PathLike,
        data_preset: Mapping[str, Any] | None = None,
        run: Mapping[str, Any] | None = None,
    ) -> None:
        self.network = network
        self.path = Path(path)
        self.data_preset, self.run = data_preset, dict(run or {})
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.should_terminate:
            self.logger.warning("FinalModelSaver: run was terminated early, final weights not written.")
            return
        state = unwrap(self.network).state_dict()
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            self.logger.error(f"FinalModelSaver: non-finite weights, {self.path} not written.")
            return
        if is_main_process():
            save_model(
                self.network, self.path, data_preset=self.data_preset, run={**self.run, "epoch": engine.state.epoch}
            )
            self.logger.info(f"FinalModelSaver: saved {self.path}.")
