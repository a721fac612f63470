"""Networks: patching, masking, position tables, the ViT encoder, MAEViT, ViTSeg, presets, display, weight transfer."""

from __future__ import annotations

from monai_mae.networks.checkpoint_io import extract_encoder_state_dict
from monai_mae.networks.display import masked_input, reconstruct_image
from monai_mae.networks.encoder import ViTEncoder
from monai_mae.networks.mae import MAEReconstructor, MAEViT
from monai_mae.networks.masking import (
    MaskGenerator,
    MaskingResult,
    content_aware_weights,
    mae_patchify_and_mask,
    patch_foreground_fraction,
    random_masking,
    restore_patches,
)
from monai_mae.networks.patch_embed import VisiblePatchEmbedding
from monai_mae.networks.patching import patchify, unpatchify
from monai_mae.networks.pos_embed import interpolate_pos_embed, sincos_pos_embed
from monai_mae.networks.presets import (
    MAE_PRESETS,
    get_preset,
    mae_vit,
    mae_vit_base,
    mae_vit_large,
    mae_vit_small,
    mae_vit_tiny,
)
from monai_mae.networks.residual import match_residual_stream, rescale_residual_stream, residual_stream_norm
from monai_mae.networks.transfer import TransferReport, load_mae_encoder

__all__ = [
    "MAEViT", "MAEReconstructor", "ViTEncoder", "VisiblePatchEmbedding", "TransferReport", "extract_encoder_state_dict",
    "load_mae_encoder", "residual_stream_norm", "rescale_residual_stream", "match_residual_stream", "MaskGenerator",
    "MaskingResult", "content_aware_weights",
    "mae_patchify_and_mask", "patch_foreground_fraction", "random_masking", "restore_patches", "patchify",
    "unpatchify", "reconstruct_image", "masked_input", "interpolate_pos_embed", "sincos_pos_embed", "MAE_PRESETS", "get_preset", "mae_vit",
    "mae_vit_base", "mae_vit_large", "mae_vit_small", "mae_vit_tiny",
]  # fmt: skip
