"""Data layer: synthetic CT phantoms, Decathlon datalists, and CT/MRI transform presets."""

from __future__ import annotations

from monai_mae.data.datalist import check_nifti, check_volume, load_datalist, validate_datalist
from monai_mae.data.synthetic import ensure_dataset, make_phantom, write_synthetic_dataset
from monai_mae.data.transforms import (
    ReplaceNonFinited,
    data_preset_names,
    get_dataset,
    get_pretrain_transforms,
    load_data_preset,
)

__all__ = [
    "ReplaceNonFinited",
    "check_nifti",
    "check_volume",
    "data_preset_names",
    "ensure_dataset",
    "get_dataset",
    "get_pretrain_transforms",
    "load_data_preset",
    "load_datalist",
    "make_phantom",
    "validate_datalist",
    "write_synthetic_dataset",
]
