"""``ViTSeg``: a pure-ViT segmentation network with a light transposed-convolution decoder.

The encoder is :class:`~monai_mae.networks.encoder.ViTEncoder`, as in :class:`~monai_mae.networks.mae.MAEViT`,
run on every token, with the same parameter names (``patch_embedding.*``, ``blocks.N.*``, ``norm.*``), so an
MAE checkpoint loads with :func:`~monai_mae.networks.transfer.load_mae_encoder`. After the final norm the
token grid is turned back into an image and upsampled by one transposed convolution per factor of 2 of the
patch size (each followed by a norm and an activation) to full-resolution logits. This is the shape of Primus
(Wald et al., arXiv 2503.01835), which reaches nnU-Net's level with 8^3 patches.

With ``conv_skips=True`` the network is a hybrid in the manner of UNETR (Hatamizadeh et al., arXiv 2103.10504): a
small convolutional stem on the input image gives features at full and at half resolution, which are concatenated
into the last two upsampling stages (each followed by one 3^d convolution that fuses them), so the decoder sees
image detail finer than a patch. The stem and the fusing convolutions belong to the decoder: the encoder's
parameters and names are the same with and without them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers import Conv, get_act_layer, get_norm_layer

from monai_mae.networks.encoder import ViTEncoder, records_init_args
from monai_mae.networks.patching import patchify

__all__ = ["ViTSeg", "upsampling_strides"]


def upsampling_strides(patch_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-stage strides of the decoder: one stage per factor of 2, axes with smaller patches stop early.

    ``(8, 8, 8) -> [(2, 2, 2)] * 3``; ``(8, 8, 4) -> [(2, 2, 2), (2, 2, 2), (2, 2, 1)]``.

    Raises:
        ValueError: when a patch side is not a power of 2.
    """
    sides = [int(p) for p in patch_size]
    if any(p < 1 or p & (p - 1) for p in sides):
        raise ValueError(
            f"ViTSeg needs power-of-2 patch sides (one x2 upsampling stage per factor), got {tuple(sides)}."
        )
    stages = max(p.bit_length() - 1 for p in sides)
    return [tuple(2 if (p >> s) > 1 else 1 for p in sides) for s in range(stages)]


class ViTSeg(ViTEncoder):
    """Pure vision transformer for 2D/3D segmentation: ViT encoder on all tokens + light decoder.

    Args:
        in_channels: input channels.
        out_channels: output channels (logits; classes including background).
        img_size: spatial size the position table is built for; other sizes that the patch divides
            work too (the table is rebuilt or interpolated; RoPE needs no table).
        patch_size: per-axis patch size, powers of 2. Defaults to 8.
        hidden_size: encoder width. Defaults to 768.
        mlp_dim: encoder MLP width. Defaults to 3072.
        num_layers: encoder blocks. Defaults to 12.
        num_heads: attention heads. Defaults to 12.
        qkv_bias: bias on the qkv projection: False, True or ``"qv"`` (queries and values only, as Primus).
            Defaults to False.
        pos_embed_type: ``"sincos"``, ``"learnable"``, ``"none"``, ``"fourier"`` or ``"rope"``. Defaults to ``"sincos"``.
        mlp_type: ``"gelu"`` or ``"swiglu"``. Defaults to ``"gelu"``.
        layer_scale_init: LayerScale's initial value; None (default) for none.
        drop_path_rate: stochastic depth of the last block (linear from 0). Defaults to 0.
        proj_type: patch projection, ``"conv"`` or ``"perceptron"``. Defaults to ``"conv"``.
        dropout_rate: dropout in the encoder. Defaults to 0.
        spatial_dims: 2 or 3. Defaults to 3.
        decoder_channels: channels after each upsampling stage; None (default) halves from
            ``32 * 2 ** (stages - 1)`` down to 32 (``(128, 64, 32)`` for 8^3 patches).
        norm_name: decoder norm (MONAI name). Defaults to ``("instance", {"affine": True})``.
        act_name: decoder activation (MONAI name). Defaults to ``"GELU"``.
        rope_theta: RoPE frequency base. Defaults to 100.
        activation_checkpointing: recompute encoder block activations in the backward pass. Defaults to False.
        attn_norm: keyword-only. LayerNorm over the merged heads before each attention's output projection
            (``attn.norm``). Defaults to False.
        mlp_norm: keyword-only. LayerNorm over each MLP's hidden units before ``linear2`` (``mlp.norm``).
            Defaults to False.
        abs_pos_embed: keyword-only. With ``pos_embed_type="rope"``, a learnable absolute table added to the
            tokens as well. Defaults to False.
        conv_skips: keyword-only. Add convolutional skip connections (UNETR-like hybrid): ``skip_stem.0``, a 3^d
            convolution + norm + activation on the input image at full resolution with ``decoder_channels[-1]``
            channels, and ``skip_stem.1``, a strided 3^d convolution of those features to the resolution of the
            last stage's input (half resolution for 8^3 patches) with ``decoder_channels[-2]`` channels. Each is
            concatenated to the output of the decoder stage of its resolution and fused back to that stage's
            channels by a 3^d convolution + norm + activation (``skip_fuse.*``). Stem and fusion count as decoder
            (:func:`~monai_mae.engines.finetune.encoder_parameters` leaves them out). Needs a patch of at least 2
            on some axis; with one upsampling stage only the full-resolution skip is built. Defaults to False (no
            new parameters: state dicts and model files of the plain ViTSeg load unchanged).

    ``vitseg_preset("primus_m", ...)`` (:mod:`~monai_mae.networks.presets`) has Primus-M's encoder, all these
    options on.

    Raises:
        ValueError: for an inconsistent argument (the message names it).

    Examples::

        >>> tiny = dict(hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4)
        >>> # 3D, 8^3 patches on 32^3 crops (64 tokens), Primus-like blocks: RoPE, SwiGLU, LayerScale
        >>> net = ViTSeg(1, 5, 32, **tiny, pos_embed_type="rope", mlp_type="swiglu", layer_scale_init=0.1)
        >>> net(torch.randn(1, 1, 32, 32, 32)).shape
        torch.Size([1, 5, 32, 32, 32])
        >>> # 2D, 16^2 patches
        >>> net = ViTSeg(1, 3, (64, 64), patch_size=16, spatial_dims=2, **tiny)
        >>> net(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
        >>> # hybrid: convolutional features at full and half resolution join the last two decoder stages
        >>> net = ViTSeg(1, 5, 32, **tiny, conv_skips=True)
        >>> net(torch.randn(1, 1, 32, 32, 32)).shape
        torch.Size([1, 5, 32, 32, 32])
        >>> sorted({name.split(".")[0] for name, _ in net.named_parameters()})
        ['blocks', 'decoder', 'head', 'norm', 'patch_embedding', 'skip_fuse', 'skip_stem']

    Full size, e.g. a Primus-S-like encoder on 96^3 crops (1728 tokens)::

        net = ViTSeg(1, 5, 96, hidden_size=384, mlp_dim=1536, num_heads=6, pos_embed_type="rope",
                     mlp_type="swiglu", layer_scale_init=0.1, drop_path_rate=0.1)
        net(torch.randn(1, 1, 96, 96, 96)).shape  # torch.Size([1, 5, 96, 96, 96])
    """

    @records_init_args
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int = 8,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        qkv_bias: bool | str = False,
        pos_embed_type: str = "sincos",
        mlp_type: str = "gelu",
        layer_scale_init: float | None = None,
        drop_path_rate: float = 0.0,
        proj_type: str = "conv",
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        decoder_channels: Sequence[int] | None = None,
        norm_name: str | tuple = ("instance", {"affine": True}),
        act_name: str | tuple = "GELU",
        rope_theta: float = 100.0,
        activation_checkpointing: bool = False,
        *,
        attn_norm: bool = False,
        mlp_norm: bool = False,
        abs_pos_embed: bool = False,
        conv_skips: bool = False,
    ) -> None:
        for name, value in (("out_channels", out_channels), ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        super().__init__(
            in_channels,
            img_size,
            patch_size,
            hidden_size,
            mlp_dim,
            num_layers,
            num_heads,
            proj_type=proj_type,
            pos_embed_type=pos_embed_type,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            qkv_bias=qkv_bias,
            mlp_type=mlp_type,
            layer_scale_init=layer_scale_init,
            drop_path_rate=drop_path_rate,
            rope_theta=rope_theta,
            activation_checkpointing=activation_checkpointing,
            attn_norm=attn_norm,
            mlp_norm=mlp_norm,
            abs_pos_embed=abs_pos_embed,
        )
        self.out_channels = out_channels
        self.strides = upsampling_strides(self.patch_size)
        if decoder_channels is None:
            decoder_channels = [32 * 2 ** (len(self.strides) - 1 - i) for i in range(len(self.strides))]
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != len(self.strides) or min(decoder_channels, default=1) < 1:
            raise ValueError(
                f"decoder_channels needs {len(self.strides)} positive entries (one per x2 stage of patch size "
                f"{self.patch_size}), got {decoder_channels}."
            )

        # decoder: one transposed conv + norm + activation per x2 stage, then 1x1 conv to logits
        stages: list[nn.Module] = []
        channels = hidden_size
        for stride, out in zip(self.strides, decoder_channels):
            stages.append(
                nn.Sequential(
                    Conv[Conv.CONVTRANS, spatial_dims](channels, out, kernel_size=stride, stride=stride),
                    get_norm_layer(norm_name, spatial_dims=spatial_dims, channels=out),
                    get_act_layer(act_name),
                )
            )
            channels = out
        self.decoder = nn.Sequential(*stages)
        self.head = Conv[Conv.CONV, spatial_dims](channels, out_channels, kernel_size=1)
        self._init_weights()  # the encoder's, after the decoder: the order in which a seed draws the weights
        self.conv_skips = bool(conv_skips)
        #: decoder stage index -> index into ``skip_stem`` / ``skip_fuse`` (empty without ``conv_skips``)
        self.skip_stages: dict[int, int] = {}
        if self.conv_skips:  # drawn last: a seed gives the hybrid the plain network's encoder, decoder and head
            self._build_conv_skips(decoder_channels, norm_name, act_name)

    def _build_conv_skips(self, decoder_channels: Sequence[int], norm_name: str | tuple, act_name: str | tuple) -> None:
        """The stem (``skip_stem``: full, then half resolution) and the fusing convolutions (``skip_fuse``).

        Raises:
            ValueError: when the patch size leaves no upsampling stage to join.
        """
        if not self.strides:
            raise ValueError(
                f"conv_skips needs at least one x2 upsampling stage, i.e. a patch side >= 2, got patch size "
                f"{self.patch_size}."
            )
        dims = self.spatial_dims
        last = len(self.strides) - 1
        joins = [(last, 1)] + ([(last - 1, self.strides[last])] if last >= 1 else [])  # (stage, stem stride)
        stem: list[nn.Module] = []
        fuse: list[nn.Module] = []
        channels = self.in_channels
        for k, (stage, stride) in enumerate(joins):
            width = decoder_channels[stage]
            stem.append(Convolution(dims, channels, width, strides=stride, kernel_size=3, norm=norm_name, act=act_name))
            fuse.append(Convolution(dims, 2 * width, width, kernel_size=3, norm=norm_name, act=act_name))
            self.skip_stages[stage] = k
            channels = width
        self.skip_stem = nn.Sequential(*stem)  # run in order: each stem stage feeds the next
        self.skip_fuse = nn.ModuleList(fuse)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Encoder output ``(B, N, hidden_size)`` after the final norm, and the patch grid."""
        grid = self.check_input(x)
        return self.encode_patches(patchify(x, self.patch_size), grid), grid

    def skip_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's features of ``x`` ``(B, C_in, *S)``: ``[(B, decoder_channels[-1], *S),
        (B, decoder_channels[-2], *S / strides[-1])]`` (the second only with two or more stages); ``[]``
        without ``conv_skips``."""
        features = []
        for block in self.skip_stem if self.conv_skips else ():
            x = block(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S)`` -> logits ``(B, out_channels, *S)``."""
        tokens, grid = self.forward_features(x)
        feature_map = tokens.transpose(1, 2).reshape(tokens.shape[0], self.hidden_size, *grid)  # (B, D, *grid)
        skips = self.skip_features(x)
        for i, stage in enumerate(self.decoder):
            feature_map = stage(feature_map)  # (B, decoder_channels[i], *grid * prod(strides[: i + 1]))
            k = self.skip_stages.get(i)
            if k is not None:
                feature_map = self.skip_fuse[k](torch.cat([feature_map, skips[k]], dim=1))  # same shape
        return self.head(feature_map)

    @property
    def num_tokens(self) -> int:
        """Tokens per input of ``img_size``."""
        return math.prod(self.grid_size)
