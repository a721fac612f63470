"""Named MAEViT sizes (the MAE paper's widths and depths), 2D and 3D.

``MAE_PRESETS`` is the single source of the sizes; ``configs/model_<name>.json`` mirror it for
bundles and the command line (a test keeps them equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.utils import look_up_option

from monai_mae.networks.mae import MAEViT

__all__ = ["MAE_PRESETS", "get_preset", "mae_vit", "mae_vit_tiny", "mae_vit_small", "mae_vit_base", "mae_vit_large"]

MAE_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=192, mlp_dim=768, num_layers=12, num_heads=3,
        decoder_hidden_size=128, decoder_mlp_dim=512, decoder_num_layers=4, decoder_num_heads=4,
    ),
    "small": dict(
        hidden_size=384, mlp_dim=1536, num_layers=12, num_heads=6,
        decoder_hidden_size=256, decoder_mlp_dim=1024, decoder_num_layers=4, decoder_num_heads=8,
    ),
    "base": dict(
        hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12,
        decoder_hidden_size=512, decoder_mlp_dim=2048, decoder_num_layers=8, decoder_num_heads=16,
    ),
    "large": dict(
        hidden_size=1024, mlp_dim=4096, num_layers=24, num_heads=16,
        decoder_hidden_size=512, decoder_mlp_dim=2048, decoder_num_layers=8, decoder_num_heads=16,
    ),
}  # fmt: skip


def get_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The architecture settings of a named size, with ``overrides`` applied.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    return {**look_up_option(name, MAE_PRESETS), **overrides}


def mae_vit(
    name: str,
    in_channels: int = 1,
    img_size: Sequence[int] | int = 96,
    patch_size: Sequence[int] | int = 16,
    spatial_dims: int = 3,
    **overrides: Any,
) -> MAEViT:
    """Build a named :class:`MAEViT`; ``overrides`` replace any preset value or add other arguments.

    Examples::

        >>> net = mae_vit("base", img_size=96, patch_size=16)              # 3D ViT-B, 216 tokens
        >>> net = mae_vit("small", img_size=224, patch_size=16, spatial_dims=2)
    """
    settings = get_preset(name, **overrides)
    return MAEViT(in_channels=in_channels, img_size=img_size, patch_size=patch_size, spatial_dims=spatial_dims, **settings)


def mae_vit_tiny(**kwargs: Any) -> MAEViT:
    """ViT-Ti encoder (192 x 12), decoder 128 x 4. See :func:`mae_vit` for the arguments."""
    return mae_vit("tiny", **kwargs)


def mae_vit_small(**kwargs: Any) -> MAEViT:
    """ViT-S encoder (384 x 12), decoder 256 x 4. See :func:`mae_vit` for the arguments."""
    return mae_vit("small", **kwargs)


def mae_vit_base(**kwargs: Any) -> MAEViT:
    """ViT-B encoder (768 x 12), decoder 512 x 8 as in the MAE paper. See :func:`mae_vit`."""
    return mae_vit("base", **kwargs)


def mae_vit_large(**kwargs: Any) -> MAEViT:
    """ViT-L encoder (1024 x 24), decoder 512 x 8 as in the MAE paper. See :func:`mae_vit`."""
    return mae_vit("large", **kwargs)
