"""``ViTEncoder``: the ViT encoder that :class:`~monai_mae.networks.mae.MAEViT` and
:class:`~monai_mae.networks.vitseg.ViTSeg` are built on.

It owns the patch embedding, the optional class token, the blocks, the final norm and the axial RoPE,
their argument checks and their initialisation. The networks subclass it (as the MAE paper's
fine-tuning model subclasses its ViT) rather than holding it as ``self.vit``, so that the encoder's
weights keep MONAI ``ViT``'s names at the top of their state dicts (``patch_embedding.*``,
``cls_token``, ``blocks.N.*``, ``norm.*``): model files, MONAI ``ViT`` / ``UNETR`` and
:func:`~monai_mae.networks.transfer.load_mae_encoder` read them as they are.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn as nn
from monai.utils import ensure_tuple_rep

from monai_mae.networks.attention import check_heads, check_qkv_bias
from monai_mae.networks.blocks import build_blocks, run_blocks
from monai_mae.networks.patch_embed import VisiblePatchEmbedding
from monai_mae.networks.patching import check_image_input
from monai_mae.networks.rope import AxialRoPE, Rope, grid_coordinates

__all__ = ["ViTEncoder", "records_init_args", "PRIMUS_EXACT"]

#: The encoder options that, on top of RoPE, SwiGLU and LayerScale, make the blocks exactly Primus'
#: (timm's ``EvaBlock`` as Primus builds it): no key bias, the attention and MLP sub-norms, a learnable
#: absolute table added with RoPE, and RoPE's frequency base 10000. All off / 100 by default.
PRIMUS_EXACT: dict[str, Any] = dict(
    qkv_bias="qv", attn_norm=True, mlp_norm=True, abs_pos_embed=True, rope_theta=10000.0
)

_Init = TypeVar("_Init", bound=Callable[..., None])


def records_init_args(init: _Init) -> _Init:
    """Decorate a network's ``__init__`` so that the network keeps its constructor's arguments, defaults
    filled in, in ``init_args`` (what self-describing model files write, and rebuild the network from)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        self.init_args = {k: v for k, v in bound.arguments.items() if k != "self"}

    return wrapper  # type: ignore[return-value]


class ViTEncoder(nn.Module):
    """Patch embedding, optional class token, transformer blocks, final norm and RoPE of a ViT (a base class).

    A subclass builds the rest of its network after ``super().__init__`` and then calls
    :meth:`_init_weights` once, naming its own linear layers and tokens: weights are drawn in that one
    order, so a seed gives the same network.

    Args:
        in_channels: input channels.
        img_size: spatial size the position table is built for.
        patch_size: per-axis patch size.
        hidden_size: token width.
        mlp_dim: MLP hidden units.
        num_layers: blocks.
        num_heads: attention heads.
        proj_type: ``"conv"`` or ``"perceptron"``. Defaults to ``"conv"``.
        pos_embed_type: ``"none"``, ``"learnable"``, ``"sincos"``, ``"fourier"`` or ``"rope"`` (axial rotary
            embeddings in every block, a fixed zero table). Defaults to ``"sincos"``.
        dropout_rate: dropout in [0, 1] after the position table, in attention and MLP. Defaults to 0.
        spatial_dims: 2 or 3. Defaults to 3.
        qkv_bias: bias on the qkv projection: False, True, or ``"qv"`` (queries and values only, no key bias:
            ``attn.q_bias`` / ``attn.v_bias`` instead of ``attn.qkv.bias``). Defaults to False.
        mlp_type: ``"gelu"`` or ``"swiglu"``. Defaults to ``"gelu"``.
        layer_scale_init: LayerScale's initial value; None (default) for none.
        drop_path_rate: stochastic depth of the last block (linear from 0 in the first). Defaults to 0.
        rope_theta: RoPE frequency base. Defaults to 100.
        cls_token: prepend a learnable class token. Defaults to False.
        activation_checkpointing: recompute block activations in the backward pass. Defaults to False.
        monai_blocks: use MONAI's ``TransformerBlock`` unless RoPE, ``mlp_type``, ``layer_scale_init``,
            ``drop_path_rate``, ``qkv_bias="qv"``, ``attn_norm`` or ``mlp_norm`` need
            :class:`~monai_mae.networks.blocks.EncoderBlock`. Defaults to False.
        save_attn: MONAI's blocks keep their attention matrices. Defaults to False.
        use_flash_attention: MONAI's blocks use fused attention. Defaults to True.
        attn_norm: LayerNorm over the merged heads before each attention's output projection (``attn.norm``).
            Defaults to False.
        mlp_norm: LayerNorm over each MLP's hidden units before ``linear2`` (``mlp.norm``). Defaults to False.
        abs_pos_embed: with ``pos_embed_type="rope"``, a learnable absolute table added to the tokens as well
            (``patch_embedding.position_embeddings``, otherwise a fixed zero table). Defaults to False.

    With ``qkv_bias="qv"``, ``attn_norm``, ``mlp_norm``, ``abs_pos_embed``, RoPE, SwiGLU, LayerScale and
    ``rope_theta=10000`` the encoder is Primus' (:data:`PRIMUS_EXACT`), with RoPE's channel pairing its own:
    channel ``j`` of a head rotates with ``j + R`` (timm pairs neighbouring channels).

    Raises:
        ValueError: for an inconsistent argument (the message names it).
    """

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int,
        hidden_size: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        *,
        proj_type: str = "conv",
        pos_embed_type: str = "sincos",
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        qkv_bias: bool | str = False,
        mlp_type: str = "gelu",
        layer_scale_init: float | None = None,
        drop_path_rate: float = 0.0,
        rope_theta: float = 100.0,
        cls_token: bool = False,
        activation_checkpointing: bool = False,
        monai_blocks: bool = False,
        save_attn: bool = False,
        use_flash_attention: bool = True,
        attn_norm: bool = False,
        mlp_norm: bool = False,
        abs_pos_embed: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
        check_heads(hidden_size, num_heads)
        check_qkv_bias(qkv_bias)
        if not 0.0 <= dropout_rate <= 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1], got {dropout_rate}.")
        self.in_channels, self.spatial_dims, self.hidden_size = in_channels, spatial_dims, hidden_size
        self.img_size = tuple(ensure_tuple_rep(img_size, spatial_dims))
        self.patch_size = tuple(ensure_tuple_rep(patch_size, spatial_dims))
        self.activation_checkpointing = activation_checkpointing

        self.patch_embedding = VisiblePatchEmbedding(
            in_channels,
            self.img_size,
            self.patch_size,
            hidden_size,
            proj_type,
            pos_embed_type,
            dropout_rate,
            spatial_dims,
            abs_pos_embed=abs_pos_embed,
        )
        self.grid_size = self.patch_embedding.grid_size
        self.num_prefix_tokens = int(bool(cls_token))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if cls_token else None
        self.use_rope = self.patch_embedding.pos_embed_type == "rope"
        monai_blocks = monai_blocks and not self.use_rope and mlp_type == "gelu"
        monai_blocks = monai_blocks and layer_scale_init is None and drop_path_rate == 0
        monai_blocks = monai_blocks and qkv_bias != "qv" and not attn_norm and not mlp_norm
        if save_attn and not monai_blocks:
            raise ValueError(
                "save_attn needs the default blocks (no rope, mlp_type, layer_scale_init, drop_path_rate, "
                "qkv_bias='qv', attn_norm or mlp_norm)."
            )
        #: the block options besides the sizes, for further blocks of the same kind (an MAE decoder's)
        self.block_options: dict[str, Any] = dict(
            mlp_type=mlp_type,
            layer_scale_init=layer_scale_init,
            attn_norm=attn_norm,
            mlp_norm=mlp_norm,
            monai_blocks=monai_blocks,
            save_attn=save_attn,
            use_flash_attention=use_flash_attention,
        )
        self.blocks = build_blocks(
            num_layers,
            hidden_size,
            mlp_dim,
            num_heads,
            dropout_rate,
            qkv_bias,
            drop_path_rate=drop_path_rate,
            **self.block_options,
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.rope = AxialRoPE(hidden_size // num_heads, spatial_dims, rope_theta) if self.use_rope else None

    def _init_weights(self, *linears: nn.Module, tokens: Sequence[nn.Parameter] = ()) -> None:
        """Xavier-uniform weights and zero biases for every ``nn.Linear`` in the blocks and then in ``linears``;
        N(0, 0.02) for the class token and then ``tokens``. The patch projection initialises itself."""
        for module in (self.blocks, *linears):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.xavier_uniform_(sub.weight)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
        for token in (self.cls_token, *tokens):
            if token is not None:
                nn.init.normal_(token, std=0.02)

    def check_input(self, x: torch.Tensor) -> tuple[int, ...]:
        """Validate ``x`` of shape ``(B, C, *S)`` and return its patch grid ``S // P``.

        Raises:
            ValueError: wrong number of dimensions, wrong channel count, or a spatial size that the
                patch size does not divide (the message names the network's class).
        """
        return check_image_input(x, self.spatial_dims, self.in_channels, self.patch_size, type(self).__name__)

    def _rope(
        self,
        rope: AxialRoPE | None,
        grid: tuple[int, ...],
        indices: torch.Tensor | None,
        device: torch.device,
        prefix: bool = True,
    ) -> Rope | None:
        """Rotary ``(cos, sin)`` of ``rope`` for a class token (when ``prefix``) and the tokens at ``indices``
        ``(B, M)`` of ``grid`` (all when None); None without ``rope``."""
        if rope is None:
            return None
        prefix_tokens = self.num_prefix_tokens if prefix else 0
        return rope(grid_coordinates(grid, indices, device=device), prefix_tokens=prefix_tokens)

    def encode_patches(
        self, patches: torch.Tensor, grid: tuple[int, ...], indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed and encode patches of an input with patch grid ``grid``.

        Args:
            patches: ``(B, M, prod(P) * C)`` patches in token layout (:func:`~monai_mae.networks.patching.patchify`).
            grid: the input's patch grid.
            indices: ``(B, M)`` ascending grid indices of ``patches`` (the visible ones); None (default): all
                ``N = prod(grid)`` patches in grid order.

        Returns:
            ``(B, prefix + M, hidden_size)`` after the final norm, the class token (if any) first.
        """
        if indices is None:
            tokens = self.patch_embedding.embed_all(patches, grid)  # (B, N, D)
        else:
            tokens = self.patch_embedding(patches, indices, grid)  # (B, M, D)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        rope = self._rope(self.rope, grid, indices, tokens.device)
        x = run_blocks(self.blocks, tokens, rope, self.activation_checkpointing)  # (B, prefix + M, D)
        return self.norm(x)
