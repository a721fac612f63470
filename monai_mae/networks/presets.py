"""Named MAEViT sizes, 2D and 3D: the MAE paper's ViTs and the Primus family for 8^3 patches.

``MAE_PRESETS`` is the single source of the sizes. ``configs/model_<name>.json`` are generated from
it (:func:`write_preset_configs`) as overrides of the ``mae_pretrain`` bundle's
``network_def`` (``network_def#hidden_size``, ...); a test keeps them equal, and another checks that
the bundle's default ``network_def`` is ``MAE_PRESETS["base"]``.

Two families:

* ``tiny``, ``small``, ``base``, ``large``: ViT-Ti/S/B/L encoders (He et al., "Masked Autoencoders
  Are Scalable Vision Learners", arXiv 2111.06377: MLP 4x width, qkv bias, class token, GELU,
  sin-cos positions), meant for 16^3 patches (216 tokens on 96^3 crops). ``base`` and ``large`` have
  the paper's 512 x 8 decoder; ``tiny`` and ``small`` a narrower 4-block one.
* ``primus_s``, ``primus_b``, ``primus_m``, ``primus_l``: the encoder sizes of Primus (Wald et al.,
  "Primus: Enforcing Attention Usage for 3D Medical Image Segmentation", arXiv 2503.01835), meant
  for 8^3 patches, i.e. long sequences (``mae_vit("primus_b", img_size=160, patch_size=8)``: 8000
  tokens). Width x depth, heads: 396 x 12, 6; 792 x 12, 12; 864 x 16, 12; 1056 x 24, 16 (head width
  66 or 72, a multiple of 6, so 3D axial RoPE rotates every channel). Their encoders are exactly
  Primus' (``PrimusS/B/M/L`` of ``dynamic_network_architectures``, timm's ``EvaBlock``): axial RoPE
  with base 10000 plus a learnable absolute position table, SwiGLU with ``mlp_dim = 8/3 * width``
  hidden units (the parameters of a 4x GELU MLP: 1056, 2112, 2304, 2816) and a LayerNorm before its
  output layer, a LayerNorm over the merged heads before the attention's output projection, biases on
  queries and values but not keys, LayerScale 0.1, no class token
  (:data:`~monai_mae.networks.encoder.PRIMUS_EXACT`). One difference in layout, not in function: our
  RoPE rotates channel ``j`` of a head with channel ``j + R``, timm neighbouring channels, so Primus'
  query and key rows map to ours reordered within each head. Not reproduced: register tokens (0 in
  Primus' presets) and Primus' weight initialisation. The MAE decoder is the same light one for all
  four, with the same block options: width 384, 8 heads (head width 48), SwiGLU 1024, 2 blocks. It
  runs on every token, so at 8000 tokens its attention costs about as much as a 4-block 792 encoder
  on the 2000 visible ones; the MAE paper's ablation (Table 1a) found 1-2 decoder blocks as good as 8
  for fine-tuning. Model files of ``primus_*`` MAEs written before these options existed record none
  of them and rebuild without them (the defaults), as they were trained.

Parameters, encoder + MAE decoder (3D, one channel, without position tables): tiny 6.1M + 1.3M,
small 22.9M + 4.3M, base 88.2M + 27.7M, large 306.6M + 27.9M (16^3 patches); primus_s 22.9M + 3.9M,
primus_b 90.9M + 4.1M, primus_m 144.1M + 4.1M, primus_l 322.3M + 4.2M (8^3 patches).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.utils import look_up_option

from monai_mae.networks.encoder import PRIMUS_EXACT
from monai_mae.networks.mae import MAEViT
from monai_mae.networks.vitseg import ViTSeg

__all__ = [
    "MAE_PRESETS", "ENCODER_PRESET_KEYS", "get_preset", "encoder_preset", "mae_vit", "vitseg_preset",
    "preset_config", "write_preset_configs",
    "mae_vit_tiny", "mae_vit_small", "mae_vit_base", "mae_vit_large",
]  # fmt: skip

_PRIMUS_BLOCK: dict[str, Any] = dict(
    pos_embed_type="rope", mlp_type="swiglu", layer_scale_init=0.1, cls_token=False, **PRIMUS_EXACT,
    decoder_hidden_size=384, decoder_mlp_dim=1024, decoder_num_layers=2, decoder_num_heads=8,
)  # fmt: skip

MAE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=192, mlp_dim=768, num_layers=12, num_heads=3, qkv_bias=True,
        decoder_hidden_size=128, decoder_mlp_dim=512, decoder_num_layers=4, decoder_num_heads=4,
    ),
    "small": dict(
        hidden_size=384, mlp_dim=1536, num_layers=12, num_heads=6, qkv_bias=True,
        decoder_hidden_size=256, decoder_mlp_dim=1024, decoder_num_layers=4, decoder_num_heads=8,
    ),
    "base": dict(
        hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12, qkv_bias=True,
        decoder_hidden_size=512, decoder_mlp_dim=2048, decoder_num_layers=8, decoder_num_heads=16,
    ),
    "large": dict(
        hidden_size=1024, mlp_dim=4096, num_layers=24, num_heads=16, qkv_bias=True,
        decoder_hidden_size=512, decoder_mlp_dim=2048, decoder_num_layers=8, decoder_num_heads=16,
    ),
    "primus_s": dict(hidden_size=396, mlp_dim=1056, num_layers=12, num_heads=6, **_PRIMUS_BLOCK),
    "primus_b": dict(hidden_size=792, mlp_dim=2112, num_layers=12, num_heads=12, **_PRIMUS_BLOCK),
    "primus_m": dict(hidden_size=864, mlp_dim=2304, num_layers=16, num_heads=12, **_PRIMUS_BLOCK),
    "primus_l": dict(hidden_size=1056, mlp_dim=2816, num_layers=24, num_heads=16, **_PRIMUS_BLOCK),
}  # fmt: skip

#: The preset keys that describe the encoder alone (what :class:`ViTSeg` takes).
ENCODER_PRESET_KEYS = (
    "hidden_size", "mlp_dim", "num_layers", "num_heads", "qkv_bias", "pos_embed_type", "mlp_type", "layer_scale_init",
    "rope_theta", "attn_norm", "mlp_norm", "abs_pos_embed",
)  # fmt: skip


def get_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The :class:`MAEViT` architecture settings of a named size, with ``overrides`` applied.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    return {**look_up_option(name, MAE_PRESETS), **overrides}


def encoder_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The encoder part of a named size (:data:`ENCODER_PRESET_KEYS` that it sets), with ``overrides``.

    The result is what :class:`ViTSeg` and the ``mae_finetune`` bundle's ``encoder`` setting take.

    Examples::

        >>> encoder_preset("primus_s")
        {'hidden_size': 396, 'mlp_dim': 1056, 'num_layers': 12, 'num_heads': 6, 'qkv_bias': 'qv',
         'pos_embed_type': 'rope', 'mlp_type': 'swiglu', 'layer_scale_init': 0.1, 'rope_theta': 10000.0,
         'attn_norm': True, 'mlp_norm': True, 'abs_pos_embed': True}

    Raises:
        ValueError: for an unknown name.
    """
    preset = look_up_option(name, MAE_PRESETS)
    return {**{k: preset[k] for k in ENCODER_PRESET_KEYS if k in preset}, **overrides}


def mae_vit(
    name: str,
    in_channels: int = 1,
    img_size: Sequence[int] | int = 96,
    patch_size: Sequence[int] | int = 16,
    spatial_dims: int = 3,
    **overrides: Any,
) -> MAEViT:
    """Build a named :class:`MAEViT`; ``overrides`` replace any preset value or add other arguments.

    The ``primus_*`` sizes are meant for ``patch_size=8``.

    Examples::

        >>> import torch
        >>> with torch.device("meta"):  # shapes only: no memory, no initialisation (drop it to train)
        ...     base = mae_vit("base", img_size=96, patch_size=16)
        ...     small_2d = mae_vit("small", img_size=224, patch_size=16, spatial_dims=2)
        ...     primus = mae_vit("primus_b", img_size=160, patch_size=8)
        >>> base.grid_size, base.hidden_size  # 3D ViT-B, 216 tokens
        ((6, 6, 6), 768)
        >>> small_2d.grid_size, small_2d.hidden_size
        ((14, 14), 384)
        >>> primus.grid_size, primus.masking_ratio  # 8000 tokens, 2000 visible
        ((20, 20, 20), 0.75)
    """
    settings = get_preset(name, **overrides)
    return MAEViT(
        in_channels=in_channels, img_size=img_size, patch_size=patch_size, spatial_dims=spatial_dims, **settings
    )


def vitseg_preset(
    name: str,
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int] | int,
    patch_size: Sequence[int] | int = 8,
    spatial_dims: int = 3,
    **overrides: Any,
) -> ViTSeg:
    """Build a :class:`ViTSeg` with the encoder of a named size (:func:`encoder_preset`).

    Its encoder has the parameter names and shapes of ``mae_vit(name, ...)``'s, so a pretrained MAE of
    that size loads with :func:`~monai_mae.networks.transfer.load_mae_encoder`. ``overrides`` replace
    encoder values or add other ViTSeg arguments (``drop_path_rate``, ``decoder_channels``, ...).

    Examples::

        >>> import torch
        >>> with torch.device("meta"):  # shapes only (drop it to train)
        ...     net = vitseg_preset("primus_s", 1, 5, img_size=96)  # 1728 tokens
        ...     net(torch.empty(1, 1, 96, 96, 96)).shape
        torch.Size([1, 5, 96, 96, 96])
    """
    settings = encoder_preset(name, **overrides)
    return ViTSeg(in_channels, out_channels, img_size, patch_size=patch_size, spatial_dims=spatial_dims, **settings)


def preset_config(name: str) -> dict[str, Any]:
    """The content of ``configs/model_<name>.json``: the preset as ``network_def#<key>`` overrides."""
    comment = (
        f"MAEViT {name} size, generated from monai_mae.networks.presets.MAE_PRESETS['{name}'] "
        "(write_preset_configs): overrides of network_def in bundles/mae_pretrain/configs/train.json, "
        "layered after it: --config_file \"['configs/train.json','<this file>']\""
    )
    if name.startswith("primus"):
        comment += "; meant for 8^3 patches: add --patch_size '[8,8,8]'"
    return {"_comment": comment, **{f"network_def#{k}": v for k, v in get_preset(name).items()}}


def write_preset_configs(folder: str | Path) -> list[Path]:
    """Write ``model_<name>.json`` for every preset into ``folder``; returns the paths written.

    Regenerate the repository's mirrors after changing :data:`MAE_PRESETS`::

        python -c "from monai_mae.networks.presets import write_preset_configs; write_preset_configs('configs')"
    """
    paths = []
    for name in MAE_PRESETS:
        path = Path(folder) / f"model_{name}.json"
        path.write_text(json.dumps(preset_config(name), indent=2) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


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
