"""``MAEViT``: a drop-in, faster replacement for MONAI's ``MaskedAutoEncoderViT`` (2D and 3D)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.utils import look_up_option

from monai_mae.networks.attention import check_heads
from monai_mae.networks.blocks import build_blocks, run_blocks
from monai_mae.networks.checkpoint_adapters import monai_mae_renames
from monai_mae.networks.cross_decoder import build_cross_blocks
from monai_mae.networks.display import reconstruct_image
from monai_mae.networks.encoder import ViTEncoder, records_init_args
from monai_mae.networks.masking import (
    MaskingResult,
    mask_from_keep,
    num_visible,
    random_masking,
    sample_predicted,
    split_indices,
)
from monai_mae.networks.patching import patchify
from monai_mae.networks.pos_embed import make_pos_embed, pos_embed_for_grid
from monai_mae.networks.rope import AxialRoPE

__all__ = ["MAEViT", "MAEReconstructor"]

SUPPORTED_DECODER_POS_EMBED_TYPES = ("none", "learnable", "sincos")
SUPPORTED_DECODER_TYPES = ("self", "cross")


class MAEViT(ViTEncoder):
    """Masked autoencoder with a ViT encoder, based on He et al., "Masked Autoencoders Are Scalable
    Vision Learners" <https://arxiv.org/abs/2111.06377>.

    Takes every argument of ``monai.networks.nets.MaskedAutoEncoderViT`` with the same meaning and
    default and returns the same ``(pred, mask)``, and loads its ``state_dict``. Differences:
    the mask is drawn on the input's device; only the visible patches are projected and encoded;
    attention uses fused ``scaled_dot_product_attention`` unless ``save_attn`` is set; sin-cos
    tables exist for any width; inputs of another size than ``img_size`` are accepted (position
    tables rebuilt or interpolated); bad inputs give a ``ValueError``. The encoder is
    :class:`~monai_mae.networks.encoder.ViTEncoder`'s, its weights named as in MONAI's ``ViT``
    (``patch_embedding.*``, ``blocks.N.*``, ``norm.*``).

    Args:
        in_channels: input channels.
        img_size: spatial size the position tables are built for.
        patch_size: per-axis patch size (anisotropic sizes such as ``(16, 16, 8)`` work).
        hidden_size: encoder width. Defaults to 768.
        mlp_dim: encoder MLP width. Defaults to 512 (MONAI's default; the paper uses ``4 * hidden_size``).
        num_layers: encoder blocks. Defaults to 12.
        num_heads: encoder heads. Defaults to 12.
        masking_ratio: fraction of patches masked in training, in (0, 1). Defaults to 0.75.
        decoder_hidden_size: decoder width. Defaults to 384.
        decoder_mlp_dim: decoder MLP width. Defaults to 512.
        decoder_num_layers: decoder blocks. Defaults to 4.
        decoder_num_heads: decoder heads. Defaults to 12.
        proj_type: ``"conv"`` or ``"perceptron"``. Defaults to ``"conv"``.
        pos_embed_type: encoder position embedding, ``"none"``, ``"learnable"``, ``"sincos"``,
            ``"fourier"`` or ``"rope"`` (3D/2D axial rotary embeddings on the queries and keys of every
            encoder and decoder block, from each token's grid coordinates: no table to interpolate for
            other input sizes). Defaults to ``"sincos"``.
        decoder_pos_embed_type: ``"none"``, ``"learnable"`` or ``"sincos"``. Defaults to ``"sincos"``.
        dropout_rate: dropout in [0, 1]. Defaults to 0.
        spatial_dims: 2 or 3. Defaults to 3.
        qkv_bias: bias on the qkv projection: False, True or ``"qv"`` (queries and values only, as Primus;
            ``attn.q_bias`` / ``attn.v_bias``; the cross decoder's projections then take a bias). Defaults to False.
        save_attn: keep each block's attention matrix in ``blocks[i].attn.att_mat``. Defaults to False.
        use_flash_attention: keyword-only. Fused SDPA attention; ``None`` (default) uses it whenever
            ``save_attn`` is False and ``dropout_rate`` is 0 (MONAI's fused path applies attention
            dropout in eval mode too, so it is not used with dropout).
        activation_checkpointing: keyword-only. Recompute block activations in the backward pass to
            save memory on large volumes. Defaults to False.
        mlp_type: keyword-only. ``"gelu"`` (MONAI's MLP) or ``"swiglu"``, in encoder and decoder.
            Defaults to ``"gelu"``.
        layer_scale_init: keyword-only. LayerScale's initial value (e.g. 0.1) in encoder and decoder
            blocks; None (default) for none.
        drop_path_rate: keyword-only. Stochastic depth of the encoder, rising linearly from 0 in the
            first block to this value in the last. Defaults to 0.
        rope_theta: keyword-only. Frequency base of the rotary embeddings. Defaults to 100.
        cls_token: keyword-only. Prepend a class token (MONAI's layout). False leaves it out, as
            Primus / nnssl do, so that the encoder computes exactly what
            :class:`~monai_mae.networks.vitseg.ViTSeg` computes with the same weights. Defaults to True.
        decoder_type: keyword-only. ``"self"`` (default): the MAE decoder, self-attention over all ``N``
            tokens (visible tokens and mask tokens). ``"cross"``: opt-in CrossMAE-style decoder for long
            sequences (Fu et al., 2024, arXiv 2401.14391; :mod:`monai_mae.networks.cross_decoder`): mask
            tokens plus position (the decoder's table, and RoPE when ``pos_embed_type="rope"``) for the
            patches to reconstruct cross-attend to the visible tokens, with no self-attention among
            them, so attention costs ``O(N_pred * N_visible)`` instead of ``O(N^2)``. Same parameter
            names outside ``decoder_blocks``; not yet measured downstream.
        attn_norm: keyword-only. A LayerNorm over the merged heads before each attention's output
            projection (``attn.norm``), in encoder and self-attention decoder blocks. Defaults to False.
        mlp_norm: keyword-only. A LayerNorm over each MLP's hidden units before ``linear2`` (``mlp.norm``), in
            encoder and self-attention decoder blocks. Defaults to False.
        abs_pos_embed: keyword-only. With ``pos_embed_type="rope"``, a learnable absolute encoder table added
            to the tokens as well (otherwise a fixed zero one). Defaults to False.
        decoder_predict_ratio: keyword-only. With ``decoder_type="cross"``, the fraction of the masked
            patches reconstructed per sample in training, in (0, 1] (``round(ratio * n_masked)``, at
            least 1, drawn at random, the same count in every sample); the returned mask is 1 only at
            those. In eval mode every masked patch is reconstructed. Defaults to 1.

    With the defaults the blocks are MONAI's ``TransformerBlock`` (MONAI's state dicts and outputs);
    any of ``"rope"``, ``mlp_type``, ``layer_scale_init``, ``drop_path_rate``, ``qkv_bias="qv"``, ``attn_norm``
    or ``mlp_norm`` switches to :class:`~monai_mae.networks.blocks.EncoderBlock` (same parameter names, plus
    ``ls1`` / ``ls2``, ``attn.norm``, ``mlp.norm``, ``attn.q_bias`` / ``attn.v_bias``). The ``primus_*`` presets
    (:mod:`~monai_mae.networks.presets`) turn on all of Primus' options.
    With ``decoder_type="cross"`` the decoder blocks are
    :class:`~monai_mae.networks.cross_decoder.CrossDecoderBlock` (they keep no attention matrix).

    Raises:
        ValueError: for any inconsistent argument (the message names it).

    Examples::

        >>> tiny = dict(hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4,
        ...             decoder_hidden_size=24, decoder_mlp_dim=48, decoder_num_layers=1, decoder_num_heads=4)
        >>> # 3D: 32^3 crops, 16^3 patches: 8 tokens, 6 of them masked (ratio 0.75)
        >>> net = MAEViT(1, (32, 32, 32), 16, **tiny)
        >>> pred, mask = net(torch.randn(2, 1, 32, 32, 32))
        >>> pred.shape, mask.shape, mask.sum(1).tolist()
        (torch.Size([2, 8, 4096]), torch.Size([2, 8]), [6.0, 6.0])
        >>> # anisotropic patches
        >>> MAEViT(1, (32, 32, 16), (16, 16, 8), **tiny)(torch.randn(1, 1, 32, 32, 16))[0].shape
        torch.Size([1, 8, 2048])
        >>> # Primus-style: 8^3 patches, RoPE, SwiGLU, LayerScale
        >>> net = MAEViT(1, 32, 8, **tiny, pos_embed_type="rope", mlp_type="swiglu", layer_scale_init=0.1)
        >>> net(torch.randn(1, 1, 32, 32, 32))[0].shape
        torch.Size([1, 64, 512])
        >>> # opt-in cross-attention decoder: a quarter of the 48 masked patches reconstructed (training)
        >>> net = MAEViT(1, 32, 8, **tiny, decoder_type="cross", decoder_predict_ratio=0.25)
        >>> pred, mask = net(torch.randn(1, 1, 32, 32, 32))
        >>> pred.shape, mask.sum().item()
        (torch.Size([1, 64, 512]), 12.0)
        >>> # 2D, 3 channels, half the patches masked
        >>> pred, mask = MAEViT(3, (32, 32), 16, spatial_dims=2, masking_ratio=0.5, **tiny)(torch.randn(1, 3, 32, 32))
        >>> pred.shape, mask.sum().item()
        (torch.Size([1, 4, 768]), 2.0)

    Full size, e.g. a ViT-B encoder on 96^3 CT crops (named sizes: :mod:`monai_mae.networks.presets`)::

        net = MAEViT(in_channels=1, img_size=(96, 96, 96), patch_size=(16, 16, 16))
        pred, mask = net(torch.randn(2, 1, 96, 96, 96))  # pred (2, 216, 4096), mask (2, 216)
    """

    @records_init_args
    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int,
        hidden_size: int = 768,
        mlp_dim: int = 512,
        num_layers: int = 12,
        num_heads: int = 12,
        masking_ratio: float = 0.75,
        decoder_hidden_size: int = 384,
        decoder_mlp_dim: int = 512,
        decoder_num_layers: int = 4,
        decoder_num_heads: int = 12,
        proj_type: str = "conv",
        pos_embed_type: str = "sincos",
        decoder_pos_embed_type: str = "sincos",
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        qkv_bias: bool | str = False,
        save_attn: bool = False,
        *,
        use_flash_attention: bool | None = None,
        activation_checkpointing: bool = False,
        mlp_type: str = "gelu",
        layer_scale_init: float | None = None,
        drop_path_rate: float = 0.0,
        rope_theta: float = 100.0,
        cls_token: bool = True,
        decoder_type: str = "self",
        decoder_predict_ratio: float = 1.0,
        attn_norm: bool = False,
        mlp_norm: bool = False,
        abs_pos_embed: bool = False,
    ) -> None:
        if not 0.0 < masking_ratio < 1.0:
            raise ValueError(f"masking_ratio must be in (0, 1), got {masking_ratio}.")
        check_heads(decoder_hidden_size, decoder_num_heads, prefix="decoder_")
        decoder_pos_embed_type = look_up_option(decoder_pos_embed_type, SUPPORTED_DECODER_POS_EMBED_TYPES)
        if decoder_type not in SUPPORTED_DECODER_TYPES:
            raise ValueError(f"decoder_type must be one of {SUPPORTED_DECODER_TYPES}, got {decoder_type!r}.")
        if isinstance(decoder_predict_ratio, bool) or not isinstance(decoder_predict_ratio, (int, float)):
            raise ValueError(f"decoder_predict_ratio must be a number in (0, 1], got {decoder_predict_ratio!r}.")
        if not 0.0 < decoder_predict_ratio <= 1.0:
            raise ValueError(f"decoder_predict_ratio must be in (0, 1], got {decoder_predict_ratio}.")
        if decoder_predict_ratio < 1.0 and decoder_type != "cross":
            raise ValueError(
                f"decoder_predict_ratio={decoder_predict_ratio} needs decoder_type='cross' (the self-attention "
                "decoder reconstructs every patch)."
            )
        if use_flash_attention and save_attn:
            raise ValueError("use_flash_attention=True cannot be combined with save_attn=True.")
        if use_flash_attention and dropout_rate > 0:
            raise ValueError(
                "use_flash_attention=True needs dropout_rate=0: MONAI's fused attention path drops attention "
                "weights in eval mode too."
            )
        if use_flash_attention is None:
            use_flash_attention = not save_attn and dropout_rate == 0.0
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
            cls_token=cls_token,
            activation_checkpointing=activation_checkpointing,
            monai_blocks=True,
            save_attn=save_attn,
            use_flash_attention=use_flash_attention,
            attn_norm=attn_norm,
            mlp_norm=mlp_norm,
            abs_pos_embed=abs_pos_embed,
        )
        self.masking_ratio = masking_ratio
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_type = decoder_type
        self.decoder_predict_ratio = float(decoder_predict_ratio)
        self.decoder_pos_embed_type = decoder_pos_embed_type

        self.decoder_embed = nn.Linear(hidden_size, decoder_hidden_size)
        self.mask_tokens = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        self.decoder_pos_embedding = make_pos_embed(self.decoder_pos_embed_type, self.grid_size, decoder_hidden_size)
        sizes = (decoder_num_layers, decoder_hidden_size, decoder_mlp_dim, decoder_num_heads, dropout_rate, qkv_bias)
        if decoder_type == "cross":
            cross_sizes = (*sizes[:-1], bool(qkv_bias))  # "qv": the cross decoder's projections keep their biases
            self.decoder_blocks = build_cross_blocks(*cross_sizes, mlp_type=mlp_type, layer_scale_init=layer_scale_init)
        else:
            self.decoder_blocks = build_blocks(*sizes, **self.block_options)
        self.decoder_rope = (
            AxialRoPE(decoder_hidden_size // decoder_num_heads, spatial_dims, rope_theta) if self.use_rope else None
        )
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size)
        self.decoder_pred = nn.Linear(decoder_hidden_size, self.patch_embedding.patch_dim)
        self._init_weights(self.decoder_blocks, self.decoder_embed, self.decoder_pred, tokens=(self.mask_tokens,))
        self.register_load_state_dict_pre_hook(_load_monai_layout)

    # ------------------------------------------------------------------ stages
    def mask(
        self,
        patches: torch.Tensor,
        masking_ratio: float,
        weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
    ) -> MaskingResult:
        """Choose the visible patches: from a given ``mask`` (B, N; 1 = masked) or at random.

        A given mask is counted on its own device (a host read there) before it moves to ``patches``'
        device: a CPU mask, as :class:`~monai_mae.networks.masking.MaskGenerator` makes by default, costs
        a GPU step no synchronisation.
        """
        if mask is not None:
            return mask_from_keep(patches, mask < 0.5)
        num_visible(patches.shape[1], masking_ratio)  # a bad ratio is reported as masking_ratio
        return random_masking(patches, masking_ratio, weights=weights, generator=generator)

    def forward_encoder_tokens(self, masking: MaskingResult, grid: tuple[int, ...]) -> torch.Tensor:
        """Encode visible patches.

        Args:
            masking: the :class:`MaskingResult` of the patchified input.
            grid: the input's patch grid.

        Returns:
            ``(B, 1 + N_keep, hidden_size)``, class token first, after the final norm (``(B, N_keep,
            hidden_size)`` without a class token).
        """
        return self.encode_patches(masking.visible, grid, masking.visible_indices)  # (B, 1 + N_keep, D)

    def forward_decoder(
        self,
        latent: torch.Tensor,
        keep: torch.Tensor,
        grid: tuple[int, ...],
        predict: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reconstruct the patches from the encoded visible ones.

        Args:
            latent: ``(B, 1 + N_keep, hidden_size)`` from the encoder.
            keep: ``(B, N)`` bool keep-mask.
            grid: the input's patch grid.
            predict: ``decoder_type="cross"`` only: ``(B, M)`` indices of the patches to reconstruct; None
                (default) reconstructs every masked patch. Must be None for the self-attention decoder.
            visible: ``(B, N_keep)`` ascending indices of the visible patches
                (``MaskingResult.visible_indices``); None (default) derives them from ``keep`` (a sort on
                the device: ``N_keep`` is the latent's length, no count is read back).

        Returns:
            ``(B, N, prod(P) * C)`` predicted patches in the token layout of ``patchify``: every patch
            (self-attention decoder), or the ``predict`` patches with zeros elsewhere (cross decoder).
        """
        if self.decoder_type == "cross":
            return self._forward_cross_decoder(latent, keep, grid, predict, visible)
        if predict is not None:
            raise ValueError("predict needs decoder_type='cross': the self-attention decoder reconstructs every patch.")
        x = self.decoder_embed(latent)  # (B, prefix + N_keep, Dd)
        batch, n_tokens = keep.shape
        prefix = self.num_prefix_tokens
        visible = split_indices(keep, x.shape[1] - prefix)[0] if visible is None else visible.to(keep.device)
        full = self.mask_tokens.to(x.dtype).expand(batch, n_tokens, -1)  # (B, N, Dd)
        full = full.scatter(1, visible[..., None].expand(-1, -1, x.shape[-1]), x[:, prefix:])  # visible back in place
        pos = pos_embed_for_grid(self.decoder_pos_embedding, self.decoder_pos_embed_type, self.grid_size, grid)
        full = full + pos
        rope = self._rope(self.decoder_rope, grid, None, full.device)
        tokens = torch.cat([x[:, :prefix], full], dim=1) if prefix else full  # (B, prefix + N, Dd)
        x = run_blocks(self.decoder_blocks, tokens, rope, self.activation_checkpointing)
        return self.decoder_pred(self.decoder_norm(x[:, prefix:]))

    def _forward_cross_decoder(
        self,
        latent: torch.Tensor,
        keep: torch.Tensor,
        grid: tuple[int, ...],
        predict: torch.Tensor | None,
        visible: torch.Tensor | None,
    ) -> torch.Tensor:
        """Cross decoder: queries for the ``predict`` patches ``(B, M)`` attend to the visible tokens; ``(B, N, P)``."""
        x = self.decoder_embed(latent)  # (B, prefix + N_keep, Dd)
        batch, n_tokens = keep.shape
        prefix = self.num_prefix_tokens
        if visible is None or predict is None:
            derived = split_indices(keep, x.shape[1] - prefix)  # (B, N_keep) in grid order like the latent, the rest
            visible = derived[0] if visible is None else visible
            predict = derived[1] if predict is None else predict  # (B, M)
        visible, predict = visible.to(keep.device), predict.to(keep.device)
        pos = pos_embed_for_grid(self.decoder_pos_embedding, self.decoder_pos_embed_type, self.grid_size, grid)[0]
        memory = x[:, prefix:] + pos[visible]  # (B, N_keep, Dd)
        memory = torch.cat([x[:, :prefix], memory], dim=1) if prefix else memory  # (B, prefix + N_keep, Dd)
        queries = self.mask_tokens.to(x.dtype) + pos[predict]  # (B, M, Dd)
        rope_q = self._rope(self.decoder_rope, grid, predict, x.device, prefix=False)
        rope_kv = self._rope(self.decoder_rope, grid, visible, x.device)
        context = (memory, rope_q, rope_kv)
        y = run_blocks(self.decoder_blocks, queries, checkpointing=self.activation_checkpointing, context=context)
        out = self.decoder_pred(self.decoder_norm(y))  # (B, M, P)
        where = predict[..., None].expand(-1, -1, out.shape[-1])
        return out.new_zeros(batch, n_tokens, out.shape[-1]).scatter(1, where, out)  # (B, N, P)

    def predicted_patches(
        self, masking: MaskingResult, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The patches the decoder reconstructs and the loss covers.

        Returns:
            ``(indices, mask)``: for the self-attention decoder ``(None, masking.mask)``; for the cross decoder
            ``(B, M)`` indices of a random ``decoder_predict_ratio`` of the masked patches in training (every
            masked patch in eval mode) and the ``(B, N)`` mask that is 1 at those only.
        """
        if self.decoder_type != "cross":
            return None, masking.mask
        if not self.training or self.decoder_predict_ratio >= 1.0:  # every masked patch: what masking already knows
            return masking.masked_indices, masking.mask
        n_masked = masking.masked_indices.shape[1]  # known: no count read back from the device
        return sample_predicted(masking.mask, self.decoder_predict_ratio, generator=generator, n_masked=n_masked)

    def forward_encoder(
        self, x: torch.Tensor, masking_ratio: float = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Encoder features for downstream use.

        Args:
            x: ``(B, C, *S)``.
            masking_ratio: fraction to mask first; 0 (default) encodes every patch.
            generator: optional generator for the mask.

        Returns:
            ``(B, 1 + N_keep, hidden_size)``: class token, then the visible tokens in grid order
            (all ``N`` tokens when ``masking_ratio`` is 0).
        """
        grid = self.check_input(x)
        masking = self.mask(patchify(x, self.patch_size), masking_ratio, generator=generator)
        return self.forward_encoder_tokens(masking, grid)

    def forward(
        self,
        x: torch.Tensor,
        masking_ratio: float | None = None,
        *,
        mask_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, encode the visible patches, decode all of them.

        Args:
            x: ``(B, C, H, W)`` or ``(B, C, H, W, D)``.
            masking_ratio: overrides the constructor's ratio for this call.
            mask_weights: optional ``(B, N)`` keep-weights for the multinomial draw
                (see :func:`~monai_mae.networks.masking.content_aware_weights`).
            generator: optional ``torch.Generator`` on ``x``'s device, for reproducible masks.
            mask: optional ``(B, N)`` mask to use instead of drawing one (1 = masked; the same count
                per sample), e.g. from :class:`~monai_mae.networks.masking.MaskGenerator`. Its count is read
                on its own device: pass it on the CPU to keep a GPU step free of synchronisation.

        Returns:
            ``pred (B, N, prod(P) * C)`` and ``mask (B, N)`` with 1 = masked. With ``decoder_type="cross"``
            and ``decoder_predict_ratio < 1`` in training, ``mask`` is 1 only at the masked patches that
            were reconstructed, and ``pred`` is zero elsewhere.
        """
        grid = self.check_input(x)
        ratio = self.masking_ratio if masking_ratio is None else masking_ratio
        patches = patchify(x, self.patch_size)  # (B, N, prod(P) * C)
        masking = self.mask(patches, ratio, weights=mask_weights, generator=generator, mask=mask)
        latent = self.forward_encoder_tokens(masking, grid)  # (B, 1 + N_keep, D)
        predict, target_mask = self.predicted_patches(masking, generator)  # (B, M) or None, (B, N)
        pred = self.forward_decoder(latent, masking.keep, grid, predict, masking.visible_indices)  # (B, N, prod(P) * C)
        return pred, target_mask


def _load_monai_layout(module: MAEViT, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: accept checkpoints of MONAI's ``MaskedAutoEncoderViT``.

    The renames are :func:`~monai_mae.networks.checkpoint_adapters.monai_mae_renames` (final norms kept in
    the block lists; stale ``cross_attn`` weights of older MONAI versions dropped), applied in place.
    """
    depths = {"blocks": len(module.blocks), "decoder_blocks": len(module.decoder_blocks)}
    for old, new in monai_mae_renames(list(state_dict), prefix, depths).items():
        value = state_dict.pop(old)
        if new is not None:
            state_dict[new] = value


class MAEReconstructor(nn.Module):
    """Image-to-image view of an :class:`MAEViT`, for sliding-window inference and bundle checks.

    ``forward(x)`` masks ``x`` with a generator re-seeded with ``seed`` on every call (so the same
    window always gets the same mask), reconstructs it and returns an image of ``x``'s shape.

    Args:
        mae: the trained network.
        seed: mask seed. Defaults to 0.
        masking_ratio: ratio for reconstruction; ``None`` uses the network's.
        norm_pix_loss: whether the network was trained on normalised patches.
        paste_visible: return visible patches from the input and only masked ones predicted. Defaults to True.
    """

    def __init__(
        self,
        mae: MAEViT,
        seed: int = 0,
        masking_ratio: float | None = None,
        norm_pix_loss: bool = False,
        paste_visible: bool = True,
    ) -> None:
        super().__init__()
        self.mae = mae
        self.seed = seed
        self.masking_ratio = masking_ratio
        self.norm_pix_loss = norm_pix_loss
        self.paste_visible = paste_visible

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, C, *S)`` reconstruction."""
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        pred, mask = self.mae(x, self.masking_ratio, generator=generator)
        return reconstruct_image(
            pred, mask, x, self.mae.patch_size, norm_pix_loss=self.norm_pix_loss, paste_visible=self.paste_visible
        ).to(x.dtype)
