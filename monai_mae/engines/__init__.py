"""Training pieces that plug into MONAI's stock engines."""

from __future__ import annotations

from monai_mae.engines.augment import GPUAugmentPrepareBatch, crop_augmentation
from monai_mae.engines.bundle_parts import (
    ensure_training_data,
    first_enabled,
    rank_zero_handlers,
    start_process_group,
    window_inferer,
)
from monai_mae.engines.checkpoint import (
    AutoResume,
    BestModelSaver,
    EpochCheckpointer,
    FinalModelSaver,
    atomic_save,
    list_checkpoints,
)
from monai_mae.engines.distributed import AccumulationNoSync, freeze_unused_parameters, rewrap_ddp
from monai_mae.engines.finetune import (
    FreezeEncoder,
    encoder_parameters,
    layerwise_lr_groups,
    load_pretrained,
    save_metrics_json,
)
from monai_mae.engines.optim import build_optimizer, fused_adamw_supported, param_groups, scaled_lr
from monai_mae.engines.pictures import ReconstructionSaver, SegmentationOverlaySaver, reconstruction_panel
from monai_mae.engines.precision import (
    AmpGradScaler,
    AutocastInferer,
    amp_dtype,
    amp_inferer,
    cpu_bf16_supported,
    cuda_bf16_supported,
    engine_amp,
)
from monai_mae.engines.prepare_batch import MAEPrepareBatch, as_plain_tensor, plain_prepare_batch
from monai_mae.engines.preprocessed import (
    PreprocessedCentreCropDataset,
    PreprocessedVolumeDataset,
    check_preprocessed_dir,
)
from monai_mae.engines.reconstruction_error import (
    MaskedFillErrorProbe,
    ReconstructionErrorHandler,
    masked_fill_errors,
)
from monai_mae.engines.runtime import available_cpus, default_num_workers, keep_freed_memory, seed_and_backends
from monai_mae.engines.training import (
    GradientClipping,
    LearningRateLogger,
    NonFiniteLossError,
    NonFiniteLossGuard,
    rank_zero_summary_writer,
)
from monai_mae.utils import unwrap

__all__ = [
    "AccumulationNoSync", "AmpGradScaler", "AutoResume", "AutocastInferer", "BestModelSaver", "EpochCheckpointer", "FinalModelSaver", "FreezeEncoder", "GradientClipping", "LearningRateLogger", "MAEPrepareBatch",
    "NonFiniteLossError", "NonFiniteLossGuard", "ReconstructionSaver", "SegmentationOverlaySaver", "amp_dtype", "amp_inferer", "as_plain_tensor", "atomic_save", "available_cpus", "build_optimizer", "cpu_bf16_supported", "cuda_bf16_supported", "default_num_workers", "engine_amp", "fused_adamw_supported",
    "encoder_parameters", "freeze_unused_parameters", "rewrap_ddp", "layerwise_lr_groups", "list_checkpoints", "load_pretrained", "param_groups", "plain_prepare_batch",
    "rank_zero_summary_writer", "seed_and_backends", "keep_freed_memory", "reconstruction_panel", "save_metrics_json", "scaled_lr", "unwrap",
    "GPUAugmentPrepareBatch", "PreprocessedCentreCropDataset", "PreprocessedVolumeDataset", "check_preprocessed_dir", "crop_augmentation",
    "MaskedFillErrorProbe", "ReconstructionErrorHandler", "masked_fill_errors",
    "ensure_training_data", "first_enabled", "rank_zero_handlers", "start_process_group", "window_inferer",
]  # fmt: skip
