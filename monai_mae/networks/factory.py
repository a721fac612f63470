"""``segmentation_network``: the fine-tuning network by name (``"vitseg"`` or ``"unetr"``), described
for self-describing model files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn
from monai.networks.nets import UNETR
from monai.utils import ensure_tuple_rep, look_up_option

from monai_mae.networks.vitseg import ViTSeg

__all__ = ["ARCHITECTURES", "segmentation_network", "unetr_encoder_args"]

#: Supported values of ``architecture``.
ARCHITECTURES = ("vitseg", "unetr")
_UNETR_TARGET = "monai.networks.nets.UNETR"
_UNETR_ENCODER = ("hidden_size", "mlp_dim", "num_heads", "qkv_bias", "proj_type")


def unetr_encoder_args(settings: Mapping[str, Any], source: str = "the settings") -> dict[str, Any]:
    """The subset of MAE encoder ``settings`` that MONAI's ``UNETR`` takes, after checking what it fixes.

    Raises:
        ValueError: for a depth other than 12, a patch other than 16, or RoPE / SwiGLU / LayerScale
            (UNETR's ViT has none of them); the message names the value and ``source``.
    """
    problems = []
    if settings.get("num_layers", 12) != 12:
        problems.append(f"num_layers={settings['num_layers']} (UNETR has 12)")
    spatial_dims = int(settings.get("spatial_dims", 3))
    patch = settings.get("patch_size", 16)
    if tuple(ensure_tuple_rep(patch, spatial_dims)) != (16,) * spatial_dims:
        problems.append(f"patch_size={patch} (UNETR has 16)")
    if settings.get("pos_embed_type") == "rope":
        problems.append("pos_embed_type='rope'")
    if settings.get("mlp_type", "gelu") != "gelu":
        problems.append(f"mlp_type={settings['mlp_type']!r}")
    if settings.get("layer_scale_init") is not None:
        problems.append(f"layer_scale_init={settings['layer_scale_init']}")
    if problems:
        raise ValueError(
            f"the encoder of {source} cannot be built as MONAI's UNETR: " + ", ".join(problems)
            + "; use architecture='vitseg'."
        )
    return {k: settings[k] for k in (*_UNETR_ENCODER, "spatial_dims", "in_channels") if k in settings}


def segmentation_network(
    architecture: str,
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int] | int,
    spatial_dims: int = 3,
    encoder: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the fine-tuning network.

    Args:
        architecture: ``"vitseg"`` (:class:`~monai_mae.networks.vitseg.ViTSeg`, pure ViT, light decoder)
            or ``"unetr"`` (MONAI's ``UNETR``).
        in_channels, out_channels, img_size, spatial_dims: as for both classes. ``in_channels`` and
            ``spatial_dims`` in ``encoder`` (e.g. from :func:`~monai_mae.model_file.encoder_settings`)
            must agree.
        encoder: encoder settings (``hidden_size``, ``num_layers``, ``patch_size``, ...).
        options: architecture-specific arguments as a mapping (ViTSeg: ``drop_path_rate``,
            ``decoder_channels``; UNETR: ``feature_size``, ``norm_name``, ``res_block``, ``dropout_rate``),
            so a config can hold one dict per architecture; None values are left out.
        kwargs: more architecture-specific arguments.

    Returns:
        The network; for UNETR its constructor arguments are kept in ``network.network_spec`` so
        :func:`~monai_mae.model_file.save_model` can describe it.

    Raises:
        ValueError: for an unknown architecture, a channel or dimension mismatch with ``encoder``, or an
            encoder UNETR cannot hold.
    """
    architecture = look_up_option(architecture, ARCHITECTURES)
    encoder = dict(encoder or {})
    kwargs = {**{k: v for k, v in dict(options or {}).items() if v is not None}, **kwargs}
    for name, value in (("in_channels", in_channels), ("spatial_dims", spatial_dims)):
        if name in encoder and encoder.pop(name) != value:
            raise ValueError(f"{name}={value} differs from the encoder's {name}; the pretrained encoder fixes it.")
    common = dict(in_channels=in_channels, out_channels=out_channels, img_size=img_size, spatial_dims=spatial_dims)
    if architecture == "vitseg":
        return ViTSeg(**common, **encoder, **kwargs)
    args = {**common, **unetr_encoder_args(encoder, "the encoder settings"), **kwargs}
    args.pop("in_channels", None), args.pop("spatial_dims", None)
    args = {**common, **args}
    network = UNETR(**args)
    network.network_spec = {"_target_": _UNETR_TARGET, **args}
    return network
