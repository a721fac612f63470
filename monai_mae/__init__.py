"""monai-mae: masked-autoencoder pretraining of vision transformers on CT and MRI, as a MONAI plugin."""

from __future__ import annotations

from monai_mae.losses import MaskedReconstructionLoss
from monai_mae.networks import (
    MAE_PRESETS,
    MAEReconstructor,
    MAEViT,
    MaskGenerator,
    MaskingResult,
    content_aware_weights,
    get_preset,
    load_mae_encoder,
    mae_patchify_and_mask,
    mae_vit,
    masked_input,
    patchify,
    random_masking,
    reconstruct_image,
    restore_patches,
    unpatchify,
)
from monai_mae.version import __version__

__all__ = [
    "MAEViT", "MAEReconstructor", "MaskGenerator", "MaskingResult", "MaskedReconstructionLoss", "MAE_PRESETS", "content_aware_weights",
    "get_preset", "load_mae_encoder", "mae_patchify_and_mask", "mae_vit", "masked_input", "patchify", "random_masking",
    "reconstruct_image", "restore_patches", "unpatchify", "__version__",
]  # fmt: skip
