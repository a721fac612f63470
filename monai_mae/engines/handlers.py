"""Every Ignite handler of monai-mae under one name, for configs and code written against it.

The handlers live in one module per job: :mod:`monai_mae.engines.checkpoint` (atomic checkpoints,
automatic resume, best and final weights), :mod:`monai_mae.engines.training` (non-finite-loss guard,
gradient clipping, learning-rate logging, rank-0 TensorBoard writer) and
:mod:`monai_mae.engines.pictures` (reconstruction and segmentation-overlay pictures). Import from
there, or from :mod:`monai_mae.engines`; ``monai_mae.engines.handlers.X`` keeps working.
"""

from __future__ import annotations

from monai_mae.engines.checkpoint import (
    AutoResume,
    BestModelSaver,
    EpochCheckpointer,
    FinalModelSaver,
    atomic_save,
    list_checkpoints,
)
from monai_mae.engines.pictures import ReconstructionSaver, SegmentationOverlaySaver, reconstruction_panel
from monai_mae.engines.training import (
    GradientClipping,
    LearningRateLogger,
    NonFiniteLossError,
    NonFiniteLossGuard,
    rank_zero_summary_writer,
)
from monai_mae.utils import unwrap

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
    "SegmentationOverlaySaver",
    "reconstruction_panel",
]
