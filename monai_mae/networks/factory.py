"""``segmentation_network``: the fine-tuning network by name (``"vitseg"``, ``"unetr"`` or a CNN: ``"unet"``,
``"dynunet"``, ``"segresnet"``), described for self-describing model files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn
from monai.networks.nets import UNETR
from monai.utils import ensure_tuple_rep, look_up_option

from monai_mae.networks.cnn import CNN_ARCHITECTURES, as_lists, cnn_network
from monai_mae.networks.vitseg import ViTSeg

__all__ = ["ARCHITECTURES", "CNN_ARCHITECTURES", "segmentation_network", "unetr_encoder_args", "merge_cnn_options"]

#: Supported values of ``architecture``: the ViT networks a pretrained MAE encoder goes into, then the CNNs
#: (pretrained by masked-image modelling, :class:`~monai_mae.networks.mim.MaskedImageModel`).
ARCHITECTURES = ("vitseg", "unetr", *CNN_ARCHITECTURES)
_UNETR_TARGET = "monai.networks.nets.UNETR"
_UNETR_ENCODER = ("hidden_size", "mlp_dim", "num_heads", "qkv_bias", "proj_type")


def unetr_encoder_args(settings: Mapping[str, Any], source: str = "the settings") -> dict[str, Any]:
    """The subset of MAE encoder ``settings`` that MONAI's ``UNETR`` takes, after checking what it fixes.

    Raises:
        ValueError: for a depth other than 12, a patch other than 16, or RoPE / SwiGLU / LayerScale / Primus'
            options (``qkv_bias="qv"``, ``attn_norm``, ``mlp_norm``, ``abs_pos_embed``: UNETR's ViT has none of
            them); the message names the value and ``source``.
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
    if settings.get("qkv_bias") == "qv":
        problems.append("qkv_bias='qv'")
    problems += [f"{name}=True" for name in ("attn_norm", "mlp_norm", "abs_pos_embed") if settings.get(name)]
    if problems:
        raise ValueError(
            f"the encoder of {source} cannot be built as MONAI's UNETR: "
            + ", ".join(problems)
            + "; use architecture='vitseg'."
        )
    return {k: settings[k] for k in (*_UNETR_ENCODER, "spatial_dims", "in_channels") if k in settings}


def merge_cnn_options(
    recorded: Mapping[str, Any] | None, given: Mapping[str, Any] | None, source: str = "the pretrained file"
) -> dict[str, Any]:
    """A CNN's constructor options: those ``recorded`` in a pretrained file, plus any ``given`` that agree.

    Raises:
        ValueError: when a given (not None) option differs from the recorded one; the message names both.
    """
    recorded = dict(recorded or {})
    given = {k: v for k, v in dict(given or {}).items() if v is not None}
    clashes = [f"{k}={given[k]!r} (given) vs {recorded[k]!r} (in {source})" for k in given
               if k in recorded and as_lists(given[k]) != as_lists(recorded[k])]  # fmt: skip
    if clashes:
        raise ValueError(
            "network options contradict " + source + ": " + "; ".join(clashes) + ". Leave them out to take them "
            "from the pretrained file."
        )
    return {**recorded, **given}


def segmentation_network(
    architecture: str,
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int] | int,
    spatial_dims: int = 3,
    encoder: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    spacing: Sequence[float] | float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the fine-tuning network.

    Args:
        architecture: ``"vitseg"`` (:class:`~monai_mae.networks.vitseg.ViTSeg`, pure ViT, light decoder)
            or ``"unetr"`` (MONAI's ``UNETR``).
        in_channels, out_channels, img_size, spatial_dims: as for both classes. ``in_channels`` and
            ``spatial_dims`` in ``encoder`` (e.g. from :func:`~monai_mae.model_file.encoder_settings`)
            must agree.
        encoder: encoder settings (``hidden_size``, ``num_layers``, ``patch_size``, ...); for a CNN, the
            constructor options recorded in its pretrained file (:func:`~monai_mae.model_file.encoder_settings`).
        options: architecture-specific arguments as a mapping (ViTSeg: ``drop_path_rate``,
            ``decoder_channels``, ``conv_skips``; UNETR: ``feature_size``, ``norm_name``, ``res_block``, ``dropout_rate``; a CNN:
            its MONAI class's arguments, see :func:`~monai_mae.networks.cnn.cnn_network`), so a config can hold
            one dict per architecture; None values are left out.
        spacing: voxel size in mm, from which ``"dynunet"`` plans its stages (the others ignore it).
        kwargs: more architecture-specific arguments.

    Returns:
        The network; for UNETR and the CNNs its constructor arguments are kept in ``network.network_spec`` so
        :func:`~monai_mae.model_file.save_model` can describe it.

    Raises:
        ValueError: for an unknown architecture, a channel or dimension mismatch with ``encoder``, or an
            encoder UNETR cannot hold.
    """
    architecture = look_up_option(architecture, ARCHITECTURES)
    if architecture in CNN_ARCHITECTURES:
        merged = {**merge_cnn_options(encoder, options), **kwargs}
        return cnn_network(architecture, in_channels, out_channels, spatial_dims, img_size, spacing, merged)
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
