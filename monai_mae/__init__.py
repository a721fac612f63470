"""monai-mae: masked-autoencoder pretraining of vision transformers on CT and MRI, as a MONAI plugin."""

from __future__ import annotations

from monai_mae.losses import MaskedReconstructionLoss, masked_input, reconstruct_image
from monai_mae.networks import (
    MAE_PRESETS,
    MAEViT,
    MaskGenerator,
    MaskingResult,
    content_aware_weights,
    get_preset,
    mae_patchify_and_mask,
    mae_vit,
    patchify,
    random_masking,
    restore_patches,
    unpatchify,
)

__version__ = "0.1.0"

__all__ = [
    "MAEViT", "MaskGenerator", "MaskingResult", "MaskedReconstructionLoss", "MAE_PRESETS", "content_aware_weights",
    "get_preset", "mae_patchify_and_mask", "mae_vit", "masked_input", "patchify", "random_masking",
    "reconstruct_image", "restore_patches", "unpatchify", "__version__",
]  # fmt: skip
