"""Ignite handlers for long MAE runs: crash-safe checkpoints, automatic resume, best/final weights,
a non-finite-loss guard, gradient clipping and reconstruction pictures.

Every handler is a plain object with ``attach(engine)``, so bundles list them in ``train_handlers``
or ``val_handlers`` like MONAI's own handlers.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader
from monai.utils import CommonKeys
from PIL import Image

from monai_mae.losses import masked_input, reconstruct_image

__all__ = [
    "atomic_save",
    "rank_zero_summary_writer",
    "unwrap",
    "list_checkpoints",
    "EpochCheckpointer",
    "AutoResume",
    "BestModelSaver",
    "FinalModelSaver",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "GradientClipping",
    "LearningRateLogger",
    "ReconstructionSaver",
    "reconstruction_panel",
]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")
# the temporary file of Ignite's atomic DiskSaver (NamedTemporaryFile defaults), left behind by a kill mid-write
_IGNITE_TMP_PATTERN = re.compile(r"^tmp[a-z0-9_]{8}$")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_main_process() -> bool:
    return not _distributed() or torch.distributed.get_rank() == 0


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
    if not _is_main_process():
        return _NullSummaryWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), **kwargs)


def unwrap(network: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel``/``DataParallel`` or ``torch.compile`` wrapper."""
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


class EpochCheckpointer:
    """Save ``save_dict`` (network, optimizer, scheduler, trainer, ...) atomically every ``interval`` epochs.

    Files are ``{save_dir}/checkpoint_epoch=N.pt``, the newest ``n_saved`` are kept, and only rank 0
    writes. Writing goes through a temporary file and a rename (Ignite's atomic ``DiskSaver``), so a
    crash mid-write leaves the previous checkpoint intact.

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
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping[str, Any], n_saved: int = 2, interval: int = 1):
        if n_saved < 1 or interval < 1:
            raise ValueError(f"n_saved and interval must be >= 1, got {n_saved} and {interval}.")
        self.save_dir = Path(save_dir)
        self.interval = interval
        to_save = {k: unwrap(v) if isinstance(v, nn.Module) else v for k, v in save_dict.items()}
        self.checkpoint = Checkpoint(
            to_save,
            DiskSaver(str(self.save_dir), require_empty=False, atomic=True, create_dir=True),
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
        if not _is_main_process() or not self.save_dir.is_dir():
            return []
        for path in self.save_dir.iterdir():
            if _IGNITE_TMP_PATTERN.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                self.logger.warning(f"EpochCheckpointer: removed {path}, the temporary file of a cut-short write.")
        return [path for _, path in drop]


class AutoResume:
    """Resume from the newest valid checkpoint in ``checkpoint_dir`` when the run starts.

    Candidates are tried newest first; one that cannot be read (e.g. truncated by a crash) is
    skipped with a warning naming it. The log says which checkpoint was used, or that none was
    found and training starts from scratch.

    Args:
        checkpoint_dir: where :class:`EpochCheckpointer` writes.
        load_dict: the same objects as the checkpointer's ``save_dict``.
        map_location: passed to ``torch.load``. Defaults to ``"cpu"``.
        enabled: set False to always start fresh.
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
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # a torn or corrupt file: fall back to an older one
                self.logger.warning(f"AutoResume: skipping unreadable checkpoint {path} ({type(err).__name__}: {err}).")
                continue
            CheckpointLoader(str(path), self.load_dict, map_location=self.map_location)(engine)
            self.resumed_from = path
            self.logger.info(
                f"AutoResume: resumed from {path} (epoch {epoch}, iteration {engine.state.iteration}); "
                f"training continues to epoch {engine.state.max_epochs}."
            )
            return
        self.logger.info(f"AutoResume: no checkpoint in {self.checkpoint_dir}, starting from scratch.")


class BestModelSaver:
    """Keep the network with the best validation metric at ``path`` (atomic; rank 0 only).

    Attach to the evaluator. The best value so far is part of its ``state_dict``, so putting this
    object in the trainer checkpoint's ``save_dict`` keeps the record across a resume.

    Args:
        network: the model to save.
        path: the file, e.g. ``{output_dir}/models/model_best.pt``.
        metric_name: name in ``engine.state.metrics``. Defaults to ``"val_loss"``.
        mode: ``"min"`` (default) or ``"max"``.
    """

    def __init__(self, network: nn.Module, path: str | os.PathLike, metric_name: str = "val_loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        self.network = network
        self.path = Path(path)
        self.metric_name = metric_name
        self.mode = mode
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = 0
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

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
        if _is_main_process():
            atomic_save(unwrap(self.network).state_dict(), self.path)
            self.logger.info(f"BestModelSaver: {self.metric_name}={value:.6f} at epoch {self.best_epoch}, saved {self.path}.")


class FinalModelSaver:
    """Write the network's weights to ``path`` (atomic; rank 0 only) when training completes.

    Nothing is written when the run was terminated early or a weight is not finite.
    """

    def __init__(self, network: nn.Module, path: str | os.PathLike) -> None:
        self.network = network
        self.path = Path(path)
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
        if _is_main_process():
            atomic_save(state, self.path)
            self.logger.info(f"FinalModelSaver: saved {self.path}.")


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
        if _distributed() and torch.distributed.get_world_size() > 1:
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

    @staticmethod
    def _steps_now(engine: Engine) -> bool:
        acc = getattr(engine, "accumulation_steps", 1)
        if acc <= 1:
            return True
        length = engine.state.epoch_length
        local = (engine.state.iteration - 1) % length if length else engine.state.iteration - 1
        return (local + 1) % acc == 0 or (length is not None and local + 1 == length)

    def __call__(self, engine: Engine) -> None:
        if not self._steps_now(engine):
            return
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


class LearningRateLogger:
    """Write the optimizer's learning rate (first group) to TensorBoard every ``interval`` iterations."""

    def __init__(self, summary_writer: Any, optimizer: torch.optim.Optimizer, interval: int = 10, tag: str = "lr") -> None:
        self.summary_writer = summary_writer
        self.optimizer = optimizer
        self.interval = max(int(interval), 1)
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if _is_main_process():
            self.summary_writer.add_scalar(self.tag, self.optimizer.param_groups[0]["lr"], engine.state.iteration)


def _to_uint8(img: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (img - low) / max(high - low, 1e-8)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def reconstruction_panel(
    images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: Sequence[int], norm_pix_loss: bool = False
) -> np.ndarray:
    """A greyscale picture of the first sample: columns input / masked input / reconstruction /
    reconstruction with visible patches pasted back; rows the orthogonal mid-slices (3D) or the image (2D).

    Args:
        images: ``(B, C, *S)``; the first channel is shown.
        pred: ``(B, N, prod(P) * C)``.
        mask: ``(B, N)``.
        patch_size: per-axis patch size.
        norm_pix_loss: whether ``pred`` is per-patch normalised.

    Returns:
        ``(H, W)`` uint8 array.
    """
    images, pred, mask = images[:1].detach().float().cpu(), pred[:1].detach().float().cpu(), mask[:1].detach().cpu()
    columns = [
        images,
        masked_input(images, mask, patch_size, fill=float(images.min())),
        reconstruct_image(pred, mask, images, patch_size, norm_pix_loss=norm_pix_loss),
        reconstruct_image(pred, mask, images, patch_size, norm_pix_loss=norm_pix_loss, paste_visible=True),
    ]
    low, high = float(images.min()), float(images.max())
    volumes = [c[0, 0].numpy() for c in columns]
    if volumes[0].ndim == 2:
        views = [[v] for v in volumes]
    else:
        mid = [s // 2 for s in volumes[0].shape]
        views = [[v[:, :, mid[2]], v[:, mid[1], :], v[mid[0], :, :]] for v in volumes]
    n_rows = len(views[0])
    height = max(views[0][r].shape[0] for r in range(n_rows))
    width = max(views[0][r].shape[1] for r in range(n_rows))
    gap = 2
    panel = np.zeros((n_rows * (height + gap) - gap, 4 * (width + gap) - gap), dtype=np.uint8)
    for c, column in enumerate(views):
        for r, view in enumerate(column):
            y, x = r * (height + gap), c * (width + gap)
            panel[y : y + view.shape[0], x : x + view.shape[1]] = _to_uint8(view, low, high)
    return panel


class ReconstructionSaver:
    """Save a reconstruction picture of the first validation sample after each validation.

    Writes ``{output_dir}/reconstructions/epoch_NNNN.png`` (and ``latest.png``) and, with a
    ``summary_writer``, a TensorBoard image. Attach to the evaluator; the epoch is the trainer's.

    Args:
        output_dir: where the ``reconstructions`` folder goes.
        patch_size: the network's patch size.
        norm_pix_loss: whether the network predicts normalised patches.
        summary_writer: optional TensorBoard ``SummaryWriter``.
        scale: integer upscaling of the picture for viewing. Defaults to 2.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        patch_size: Sequence[int] | int,
        norm_pix_loss: bool = False,
        summary_writer: Any | None = None,
        scale: int = 2,
    ) -> None:
        self.folder = Path(output_dir) / "reconstructions"
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        self.summary_writer = summary_writer
        self.scale = max(int(scale), 1)
        self._first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.last_path: Path | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._first = None

    def _keep_first(self, engine: Engine) -> None:
        if self._first is None:
            output = engine.state.output
            pred, mask = output[CommonKeys.PRED]
            self._first = (output[CommonKeys.IMAGE][:1].detach(), pred[:1].detach(), mask[:1].detach())

    def __call__(self, engine: Engine) -> None:
        if self._first is None or not _is_main_process():
            return
        patch = self.patch_size if not isinstance(self.patch_size, int) else (self.patch_size,) * (self._first[0].ndim - 2)
        panel = reconstruction_panel(*self._first, patch_size=tuple(patch), norm_pix_loss=self.norm_pix_loss)
        panel = panel.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.last_path = self.folder / f"epoch_{engine.state.epoch:04d}.png"
        Image.fromarray(panel).save(self.last_path)
        Image.fromarray(panel).save(self.folder / "latest.png")
        if self.summary_writer is not None:
            self.summary_writer.add_image("reconstruction", panel, engine.state.epoch, dataformats="HW")
