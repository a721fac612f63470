"""Training pieces that plug into MONAI's stock engines."""

from __future__ import annotations

from monai_mae.engines.handlers import (
    AutoResume,
    BestModelSaver,
    EpochCheckpointer,
    FinalModelSaver,
    GradientClipping,
    LearningRateLogger,
    NonFiniteLossError,
    NonFiniteLossGuard,
    ReconstructionSaver,
    atomic_save,
    list_checkpoints,
    reconstruction_panel,
    unwrap,
)
from monai_mae.engines.optim import build_optimizer, param_groups, scaled_lr
from monai_mae.engines.prepare_batch import MAEPrepareBatch

__all__ = [
    "AutoResume", "BestModelSaver", "EpochCheckpointer", "FinalModelSaver", "GradientClipping", "LearningRateLogger", "MAEPrepareBatch",
    "NonFiniteLossError", "NonFiniteLossGuard", "ReconstructionSaver", "atomic_save", "build_optimizer",
    "list_checkpoints", "param_groups", "reconstruction_panel", "scaled_lr", "unwrap",
]  # fmt: skip
