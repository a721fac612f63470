"""Data layer: synthetic CT phantoms (simple and realistic), Decathlon datalists and nnU-Net raw folders,
CT/MRI transform presets, augmentation, and the preprocess-once path (``preprocess`` writes a folder, ``crops``
reads it)."""

from __future__ import annotations

from monai_mae.data.augment import check_augment_options, crop_augmentation, gpu_augment
from monai_mae.data.crops import (
    PreprocessedCentreCropDataset,
    PreprocessedCropDataset,
    PreprocessedVolumeDataset,
    from_storage_layout,
)
from monai_mae.data.datalist import (
    check_nifti,
    check_num_classes,
    check_volume,
    class_names,
    declared_classes,
    load_checked_datalist,
    load_datalist,
    num_classes_for,
    validate_datalist,
)
from monai_mae.data.nnunet_raw import is_nnunet_raw, nnunet_modality, read_nnunet_raw
from monai_mae.data.preprocess import (
    check_manifest,
    get_deterministic_transforms,
    preprocess_dataset,
    read_manifest,
)
from monai_mae.data.realistic import REALISTIC_ORGANS, make_realistic_phantom, realistic_spacing
from monai_mae.data.synthetic import STYLES, ensure_dataset, make_phantom, write_synthetic_dataset
from monai_mae.data.transforms import (
    ReplaceNonFinited,
    data_preset_names,
    get_dataset,
    get_pretrain_transforms,
    intensity_transform,
    load_data_preset,
)

__all__ = [
    "PreprocessedCentreCropDataset",
    "PreprocessedCropDataset",
    "PreprocessedVolumeDataset",
    "REALISTIC_ORGANS",
    "STYLES",
    "ReplaceNonFinited",
    "check_augment_options",
    "check_manifest",
    "check_nifti",
    "check_num_classes",
    "check_volume",
    "class_names",
    "crop_augmentation",
    "data_preset_names",
    "declared_classes",
    "ensure_dataset",
    "from_storage_layout",
    "get_dataset",
    "get_deterministic_transforms",
    "get_pretrain_transforms",
    "gpu_augment",
    "intensity_transform",
    "is_nnunet_raw",
    "load_checked_datalist",
    "load_data_preset",
    "load_datalist",
    "make_phantom",
    "make_realistic_phantom",
    "nnunet_modality",
    "num_classes_for",
    "preprocess_dataset",
    "read_manifest",
    "read_nnunet_raw",
    "realistic_spacing",
    "validate_datalist",
    "write_synthetic_dataset",
]
