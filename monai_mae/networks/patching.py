"""Patchify and unpatchify N-D images with per-axis (anisotropic) patch sizes.

Token layout (fixed by the design, shared by the network, the loss and the pictures):

* patches run over the patch grid in row-major order (first spatial axis slowest);
* inside a patch the values run over the patch's spatial positions first (row-major) and the
  channel last: ``b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)``.

This is the layout of MONAI's ``perceptron`` patch embedding, so a linear projection learnt on
these tokens is the same map as MONAI's ``Conv`` patch embedding once its kernel is flattened
with ``o c p1 p2 p3 -> o (p1 p2 p3 c)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from monai.utils import ensure_tuple_rep

__all__ = ["patchify", "unpatchify", "patch_grid", "patch_pattern", "check_image_input"]

_GRID = ("h", "w", "d")
_INNER = ("p1", "p2", "p3")


def patch_pattern(spatial_dims: int) -> tuple[str, str]:
    """The einops patterns of the token layout for ``spatial_dims`` (2 or 3).

    Returns:
        ``(image_pattern, token_pattern)``, e.g. for 3D
        ``("b c (h p1) (w p2) (d p3)", "b (h w d) (p1 p2 p3 c)")``.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    grid, inner = _GRID[:spatial_dims], _INNER[:spatial_dims]
    image = "b c " + " ".join(f"({g} {p})" for g, p in zip(grid, inner))
    tokens = f"b ({' '.join(grid)}) ({' '.join(inner)} c)"
    return image, tokens


def patch_grid(spatial_size: Sequence[int], patch_size: Sequence[int] | int, name: str = "images") -> tuple[int, ...]:
    """Number of patches along each spatial axis.

    Args:
        spatial_size: the image's spatial shape ``S``.
        patch_size: per-axis patch size ``P`` (an int means the same on every axis).
        name: what to call the input in error messages.

    Raises:
        ValueError: when a patch size is not positive or does not divide the size on its axis; the
            message names the axis.
    """
    spatial_size = tuple(int(s) for s in spatial_size)
    patch = ensure_tuple_rep(patch_size, len(spatial_size))
    grid = []
    for axis, (size, p) in enumerate(zip(spatial_size, patch)):
        if p <= 0:
            raise ValueError(f"patch_size must be positive, got {tuple(patch)}.")
        if size % p != 0:
            raise ValueError(
                f"{name}: spatial axis {axis} has size {size}, which is not divisible by the patch size {p} "
                f"(spatial size {spatial_size}, patch size {tuple(patch)})."
            )
        grid.append(size // p)
    return tuple(grid)


def check_image_input(
    x: torch.Tensor, spatial_dims: int, in_channels: int, patch_size: Sequence[int], owner: str
) -> tuple[int, ...]:
    """Validate a network input ``x`` of shape ``(B, C, *S)`` and return its patch grid ``S // P``.

    Args:
        x: the input.
        spatial_dims, in_channels, patch_size: what the network expects.
        owner: the network's name for the messages (e.g. ``"MAEViT"``).

    Raises:
        ValueError: wrong number of dimensions, wrong channel count, or a spatial size that the
            patch size does not divide.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != spatial_dims + 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        axes = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, H, W, D)"
        raise ValueError(f"{owner}({spatial_dims}D) expects input {axes}, got {shape}.")
    if x.shape[1] != in_channels:
        raise ValueError(f"{owner} expects {in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)}).")
    return patch_grid(x.shape[2:], patch_size, name="input")


def _check_dims(images: torch.Tensor, patch_size: Sequence[int] | int) -> tuple[int, tuple[int, ...]]:
    spatial_dims = images.ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(
            f"images must be (B, C, H, W) or (B, C, H, W, D), got a tensor with {images.ndim} dimensions "
            f"of shape {tuple(images.shape)}."
        )
    if not isinstance(patch_size, int) and len(patch_size) != spatial_dims:
        raise ValueError(
            f"patch_size {tuple(patch_size)} has {len(patch_size)} entries but images have {spatial_dims} "
            f"spatial dimensions (shape {tuple(images.shape)})."
        )
    return spatial_dims, tuple(ensure_tuple_rep(patch_size, spatial_dims))


def patchify(images: torch.Tensor, patch_size: Sequence[int] | int) -> torch.Tensor:
    """Cut images into non-overlapping patches, one token per patch.

    Args:
        images: ``(B, C, H, W)`` or ``(B, C, H, W, D)``.
        patch_size: per-axis patch size ``P``, e.g. ``(16, 16, 8)``; an int is used on every axis.

    Returns:
        ``(B, N, prod(P) * C)`` with ``N = prod(S // P)``, in the module's token layout.

    Raises:
        ValueError: wrong number of dimensions, or a patch size that does not divide its axis.

    Examples::

        >>> patchify(torch.zeros(2, 1, 32, 32, 16), (16, 16, 8)).shape
        torch.Size([2, 8, 2048])
    """
    spatial_dims, patch = _check_dims(images, patch_size)
    patch_grid(images.shape[2:], patch)
    image_pattern, token_pattern = patch_pattern(spatial_dims)
    sizes = dict(zip(_INNER, patch))
    return rearrange(images, f"{image_pattern} -> {token_pattern}", **sizes)


def unpatchify(
    patches: torch.Tensor,
    patch_size: Sequence[int] | int,
    spatial_size: Sequence[int] | int,
    in_channels: int = 1,
) -> torch.Tensor:
    """Exact inverse of :func:`patchify`.

    Args:
        patches: ``(B, N, prod(P) * C)``.
        patch_size: per-axis patch size ``P``.
        spatial_size: the image's spatial shape ``S`` (2 or 3 entries; an int is not enough to tell
            2D from 3D unless ``patch_size`` is a sequence).
        in_channels: ``C``. Defaults to 1.

    Returns:
        ``(B, C, *S)``.

    Raises:
        ValueError: when ``N`` or the token width do not match ``S``, ``P`` and ``C``.
    """
    if patches.ndim != 3:
        raise ValueError(f"patches must be (B, N, prod(P) * C), got shape {tuple(patches.shape)}.")
    if isinstance(spatial_size, int):
        if isinstance(patch_size, int):
            raise ValueError("unpatchify needs spatial_size or patch_size as a sequence to know the number of axes.")
        spatial_size = (spatial_size,) * len(patch_size)
    spatial_dims = len(spatial_size)
    patch = tuple(ensure_tuple_rep(patch_size, spatial_dims))
    if len(patch) != spatial_dims:
        raise ValueError(f"patch_size {patch} and spatial_size {tuple(spatial_size)} differ in length.")
    grid = patch_grid(spatial_size, patch, name="spatial_size")
    n_expected = 1
    for g in grid:
        n_expected *= g
    width = in_channels
    for p in patch:
        width *= p
    if patches.shape[1] != n_expected or patches.shape[2] != width:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit spatial_size {tuple(spatial_size)}, patch_size "
            f"{patch} and in_channels {in_channels}: expected (B, {n_expected}, {width})."
        )
    image_pattern, token_pattern = patch_pattern(spatial_dims)
    sizes = dict(zip(_INNER, patch))
    sizes.update(dict(zip(_GRID, grid)))
    return rearrange(patches, f"{token_pattern} -> {image_pattern}", **sizes)
