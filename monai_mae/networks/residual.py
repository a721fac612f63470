"""Rescale a pre-norm ViT's residual stream by a constant without changing what the encoder computes.

:func:`residual_stream_norm` measures the mean token norm over the outputs of all blocks,
:func:`rescale_residual_stream` multiplies the stream by a factor (every LayerNorm that reads it
ignores a common factor), and :func:`match_residual_stream` brings it to a wanted norm, e.g. a
freshly initialised network's after an MAE encoder was loaded into it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from monai_mae.networks.vit_geometry import cubic_grid, vit_grid, vit_patch_size
from monai_mae.utils import find_vit, is_positive_finite, unwrap

__all__ = ["residual_stream_norm", "rescale_residual_stream", "match_residual_stream"]


def _residual_writers(vit: nn.Module) -> list[nn.Module]:
    """The last linear layer of every residual branch of ``vit.blocks`` (attention, cross-attention, MLP).

    Raises:
        ValueError: when a block is not a pre-norm MONAI ``TransformerBlock`` whose branches end in
            an ``nn.Linear`` (then scaling the stream would change the function).
    """
    writers: list[nn.Module] = []
    for i, block in enumerate(vit.blocks):
        branches = [getattr(block, "attn", None), getattr(block, "mlp", None)]
        norms = ["norm1", "norm2"]
        if getattr(block, "with_cross_attention", False):
            branches.append(getattr(block, "cross_attn", None))
            norms.append("norm_cross_attn")
        lasts = [getattr(b, "out_proj", None) or getattr(b, "linear2", None) for b in branches]
        if not all(isinstance(last, nn.Linear) for last in lasts) or not all(
            isinstance(getattr(block, name, None), nn.LayerNorm) for name in norms
        ):
            raise ValueError(
                f"blocks.{i} ({type(block).__name__}) is not a pre-norm transformer block whose residual branches "
                "end in nn.Linear (e.g. built with include_fc=False); its residual stream cannot be rescaled exactly."
            )
        writers.extend(lasts)
    return writers


def _reference_input(vit: nn.Module, network: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Uniform noise in [0, 1] (the range of the package's intensity transforms) of the ViT's input size."""
    embed = vit.patch_embedding
    weight = getattr(embed.patch_embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 4:  # conv projection: (hidden, in_channels, *patch)
        patch, channels = tuple(int(p) for p in weight.shape[2:]), int(weight.shape[1])
    else:  # perceptron: Rearrange + Linear(in_channels * prod(patch), hidden)
        patch = vit_patch_size(vit, network)
        linear = [m for m in embed.patch_embeddings.modules() if isinstance(m, nn.Linear)]
        channels = linear[0].in_features // math.prod(patch) if patch and linear else None
    n_tokens = int(embed.position_embeddings.shape[1])
    grid = vit_grid(vit, network)
    if patch is not None and (grid is None or math.prod(grid) != n_tokens):
        grid = cubic_grid(n_tokens, len(patch))
    if grid is None or patch is None or not channels:
        raise ValueError(
            f"cannot infer the input size of {type(network).__name__} (patch grid unknown) for the reference batch; "
            "pass images= explicitly (or, in load_pretrained, a numeric residual_scale instead of 'auto')."
        )
    generator = torch.Generator().manual_seed(seed)  # leaves the global RNG alone
    shape = (batch, channels, *(g * p for g, p in zip(grid, patch)))
    table = embed.position_embeddings
    return torch.rand(shape, generator=generator).to(device=table.device, dtype=table.dtype)


@torch.no_grad()
def residual_stream_norm(network: nn.Module, images: torch.Tensor | None = None) -> float:
    """Mean L2 norm of the ViT's tokens over the outputs of all its blocks (what ``UNETR`` taps for skips).

    The block outputs are read with forward hooks, so any network whose encoder has ``blocks``
    works, whatever its ``forward`` returns (MONAI ``ViT`` / ``UNETR``, :class:`ViTSeg`).

    Args:
        network: MONAI ``UNETR``, MONAI ``ViT``, :class:`~monai_mae.networks.vitseg.ViTSeg` or a
            module with a ViT at ``.vit``.
        images: input batch ``(B, C, *spatial)`` at the ViT's input size; None uses a fixed batch of
            uniform noise in [0, 1] (seeded; the global RNG is not touched).

    Returns:
        The mean over blocks, batch and tokens of ``||hidden_state||_2``.
    """
    vit, _ = find_vit(network, "residual_stream_norm")
    if images is None:
        images = _reference_input(vit, unwrap(network))
    norms: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: norms.append(out.float().norm(dim=-1).mean()))
        for block in vit.blocks
    ]
    was_training = vit.training
    vit.eval()
    try:
        vit(images)
    finally:
        vit.train(was_training)
        for hook in hooks:
            hook.remove()
    return float(torch.stack(norms).mean())


@torch.no_grad()
def rescale_residual_stream(network: nn.Module, factor: float) -> nn.Module:
    """Multiply a pre-norm ViT's residual stream by ``factor`` without changing its output.

    Scales everything that writes into the stream (patch projection, position table, ``cls_token``,
    and the last linear layer of every attention / MLP branch). Each block reads the stream through a
    LayerNorm, which ignores a common factor (up to its ``eps``, negligible unless the stream is
    tiny), so every branch's contribution and the final ``norm(x)`` stay the same, while every hidden
    state (UNETR's skip inputs) is ``factor`` times as large.

    Why: an MAE pretrained on [0, 1] intensities can end with a residual stream tens of times larger
    than a freshly initialised ViT's (the position table alone is a sin-cos table of amplitude 1).
    Fine-tuned as is, AdamW's steps (about ``lr`` per weight, whatever the weight's size) change
    such an encoder only slowly, and UNETR's decoder receives skip features far larger than the ones
    it is initialised for. Matching the stream to a fresh network's size
    (:func:`match_residual_stream`) keeps what the encoder learned and removes both effects.

    Args:
        network: MONAI ``UNETR``, MONAI ``ViT`` or a module with a ViT at ``.vit``.
        factor: positive, finite scale.

    Returns:
        ``network`` itself.

    Raises:
        ValueError: for a factor that is not positive and finite, a network without a ViT, or blocks
            whose stream cannot be scaled exactly (see ``_residual_writers``).
    """
    if not is_positive_finite(factor):
        raise ValueError(f"factor must be a positive finite number, got {factor!r}.")
    vit, _ = find_vit(network, "rescale_residual_stream")
    writers = _residual_writers(vit)
    tensors = [*vit.patch_embedding.patch_embeddings.parameters(), vit.patch_embedding.position_embeddings]
    if isinstance(getattr(vit, "cls_token", None), torch.Tensor):
        tensors.append(vit.cls_token)
    for writer in writers:
        tensors.extend(writer.parameters())
    for tensor in tensors:
        tensor.mul_(float(factor))
    return network


def match_residual_stream(network: nn.Module, target_norm: float, images: torch.Tensor | None = None) -> float:
    """Rescale ``network``'s residual stream so :func:`residual_stream_norm` equals ``target_norm``.

    Args:
        network: MONAI ``UNETR``, MONAI ``ViT`` or a module with a ViT at ``.vit``.
        target_norm: the mean token norm wanted, e.g. ``residual_stream_norm`` of the same network
            freshly initialised (what :func:`monai_mae.engines.finetune.load_pretrained` does with
            ``residual_scale="auto"``).
        images: as for :func:`residual_stream_norm` (measure both norms on the same images).

    Returns:
        The factor applied.

    Raises:
        ValueError: for a ``target_norm`` that is not positive and finite, or as
            :func:`rescale_residual_stream`.
    """
    if not is_positive_finite(target_norm):
        raise ValueError(f"target_norm must be a positive finite number, got {target_norm!r}.")
    current = residual_stream_norm(network, images)
    if not is_positive_finite(current):
        raise ValueError(f"the residual stream of {type(network).__name__} has norm {current}; cannot rescale it.")
    factor = target_norm / current
    rescale_residual_stream(network, factor)
    return factor
