"""Random patch masking: ``torch.multinomial`` picks the visible set, fixed-size index tensors select it.

Conventions (as in MONAI and the MAE paper): ``mask`` is 1 for masked patches and 0 for visible
ones; ``keep`` is its boolean complement. Everything is computed on the tokens' device.

No host round trip: the number of visible patches is known before the draw
(``int(N * (1 - masking_ratio))``), so every tensor has a shape fixed in advance and the patches are
selected with ``sort`` / ``gather`` / ``scatter`` on index tensors, never with a boolean mask (which
would read the count back from the device). Checks that need a tensor's values run only where they
cost no device synchronisation (see :func:`random_masking`'s ``validate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from monai.utils import ensure_tuple_rep

from monai_mae.networks.patching import patch_grid, patchify
from monai_mae.utils import is_compiling

__all__ = [
    "MaskingResult",
    "random_masking",
    "num_visible",
    "split_indices",
    "mask_from_keep",
    "num_predicted",
    "sample_predicted",
    "patch_foreground_fraction",
    "content_aware_weights",
    "mae_patchify_and_mask",
    "restore_patches",
    "MaskGenerator",
]


class MaskingResult(NamedTuple):
    """What :func:`random_masking` returns (``N_keep = int(N * (1 - masking_ratio))``).

    Attributes:
        visible: ``(B, N_keep, D)`` the visible tokens, in their original order.
        keep: ``(B, N)`` bool, True where the token is visible.
        mask: ``(B, N)`` float, 1 where the token is masked.
        visible_indices: ``(B, N_keep)`` ascending indices of the visible tokens.
        masked_indices: ``(B, N - N_keep)`` ascending indices of the masked tokens.
    """

    visible: torch.Tensor
    keep: torch.Tensor
    mask: torch.Tensor
    visible_indices: torch.Tensor
    masked_indices: torch.Tensor


def num_visible(num_tokens: int, masking_ratio: float, name: str = "masking_ratio") -> int:
    """``int(N * (1 - masking_ratio))`` after checking the ratio, as MONAI counts it.

    Args:
        num_tokens: ``N``.
        masking_ratio: fraction of tokens masked, in ``[0, 1)``.
        name: the caller's name for the ratio, used in the error messages.

    Raises:
        ValueError: for a ratio outside ``[0, 1)`` or one that leaves no visible token.
    """
    if not 0.0 <= float(masking_ratio) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {masking_ratio}.")
    n_keep = int(num_tokens * (1 - masking_ratio))
    if n_keep < 1:
        raise ValueError(f"{name} {masking_ratio} leaves no visible token out of {num_tokens}.")
    return n_keep


def split_indices(selected: torch.Tensor, n_selected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending indices of the selected and of the other entries of each row, with sizes known in advance.

    A stable sort puts the selected entries first, each group in index order; unlike boolean indexing
    it needs no count from the device. Every row must select exactly ``n_selected`` entries (not checked:
    other rows give a wrong split, no error).

    Args:
        selected: ``(B, N)`` bool.
        n_selected: how many entries each row selects.

    Returns:
        ``(first (B, n_selected), rest (B, N - n_selected))``, long.

    Examples::

        >>> split_indices(torch.tensor([[False, True, False, True]]), 2)
        (tensor([[1, 3]]), tensor([[0, 2]]))
    """
    order = torch.sort(selected.logical_not().to(torch.uint8), dim=1, stable=True).indices  # (B, N)
    return order[:, :n_selected], order[:, n_selected:]


def _row_count(flags: torch.Tensor, rule: str) -> int:
    """The number of True entries per row of ``flags (B, N)``, the same in every row: a host read of ``flags``.

    Raises:
        ValueError: when rows differ (``rule`` says what every sample must do).
    """
    counts = flags.sum(dim=1)
    count = int(counts[0]) if flags.shape[0] else 0
    if bool((counts != count).any()):
        raise ValueError(f"every sample must {rule}, got counts {counts.tolist()}.")
    return count


def mask_from_keep(tokens: torch.Tensor, keep: torch.Tensor, n_keep: int | None = None) -> MaskingResult:
    """Build a :class:`MaskingResult` from a given boolean keep-mask.

    Args:
        tokens: ``(B, N, D)``.
        keep: ``(B, N)`` bool, True = visible; every row must keep the same number of tokens.
        n_keep: that number, when known. None (default) counts it from ``keep`` and checks that the
            rows agree: a host read of ``keep`` on its own device, so pass a CPU mask (moved to the
            tokens' device after counting) or give ``n_keep`` to keep a GPU step free of synchronisation.

    Raises:
        ValueError: when ``keep`` does not match ``tokens`` or rows keep different numbers of tokens
            (checked only when ``n_keep`` is None).
    """
    batch, n_tokens, width = tokens.shape
    if keep.shape != (batch, n_tokens):
        raise ValueError(f"keep mask of shape {tuple(keep.shape)} does not match tokens (B, N) = {(batch, n_tokens)}.")
    keep = keep.to(dtype=torch.bool)
    if n_keep is None:
        n_keep = _row_count(keep, "keep the same number of tokens")
    keep = keep.to(device=tokens.device, non_blocking=True)  # from the CPU: no wait for the device's queue
    visible_indices, masked_indices = split_indices(keep, n_keep)  # (B, N_keep), (B, N - N_keep)
    return MaskingResult(
        visible=tokens.gather(1, visible_indices.unsqueeze(-1).expand(-1, -1, width)),  # original order
        keep=keep,
        mask=(~keep).to(tokens.dtype if tokens.is_floating_point() else torch.float32),
        visible_indices=visible_indices,
        masked_indices=masked_indices,
    )


def _check_weights(weights: torch.Tensor, n_keep: int) -> None:
    """Value checks of keep-weights ``(B, N)`` (host reads of ``weights``)."""
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and non-negative.")
    positive = (weights > 0).sum(dim=1)
    if bool((positive < n_keep).any()):
        raise ValueError(
            f"each row of weights needs at least N_keep = {n_keep} positive entries, got {positive.min().item()}."
        )


def random_masking(
    tokens: torch.Tensor,
    mask_ratio: float,  # public name, kept (docs/library.md); elsewhere the package says masking_ratio
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    validate: bool | None = None,
) -> MaskingResult:
    """Mask a random subset of tokens per sample.

    The visible set is drawn with ``torch.multinomial`` without replacement (uniformly, or in
    proportion to ``weights``) on the tokens' device, sorted, and selected with ``gather``; the
    masked indices come from a stable sort of the keep-mask. All shapes follow from ``N_keep``, so no
    value is read back to the host (see ``validate`` for the one exception).

    Args:
        tokens: ``(B, N, D)``.
        mask_ratio: fraction of tokens to mask, in ``[0, 1)``; ``N_keep = int(N * (1 - mask_ratio))``.
        weights: optional ``(B, N)`` non-negative relative probabilities of a token being *kept
            visible* (see :func:`content_aware_weights`). Each row needs at least ``N_keep``
            positive entries.
        generator: optional ``torch.Generator`` on the tokens' device, for reproducible masks.
        validate: keyword-only. Whether to check the *values* of ``weights`` (finite, non-negative, at
            least ``N_keep`` positive per row), which reads them to the host. None (default): only when
            ``weights`` is a CPU tensor and ``torch.compile`` is not tracing, so a training step on a GPU
            never waits for these checks; True: always (a synchronisation on a GPU); False: never. The
            shape of ``weights`` is always checked. Unchecked bad weights give a device-side assert
            inside ``torch.multinomial`` (negative, infinite or NaN entries) or a draw that includes
            zero-weight tokens (too few positive entries).

    Returns:
        a :class:`MaskingResult`.

    Raises:
        ValueError: bad ``tokens`` shape, ``mask_ratio`` or ``weights``.

    Examples::

        >>> r = random_masking(torch.randn(2, 16, 8), 0.75)
        >>> r.visible.shape, r.mask.sum(1).tolist()
        (torch.Size([2, 4, 8]), [12.0, 12.0])
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, N, D), got shape {tuple(tokens.shape)}.")
    batch, n_tokens, _ = tokens.shape
    n_keep = num_visible(n_tokens, mask_ratio, name="mask_ratio")
    if weights is None:
        if n_keep == n_tokens:
            return mask_from_keep(tokens, torch.ones(batch, n_tokens, dtype=torch.bool, device=tokens.device), n_keep)
        weights = torch.ones(batch, n_tokens, device=tokens.device)
    else:
        if weights.shape != (batch, n_tokens):
            raise ValueError(f"weights must be (B, N) = {(batch, n_tokens)}, got {tuple(weights.shape)}.")
        if validate or (validate is None and weights.device.type == "cpu" and not is_compiling()):
            _check_weights(weights, n_keep)
        weights = weights.to(device=tokens.device, dtype=torch.float32, non_blocking=True)
    chosen = torch.multinomial(weights, n_keep, replacement=False, generator=generator)  # (B, N_keep)
    keep = torch.zeros(batch, n_tokens, dtype=torch.bool, device=tokens.device).scatter_(1, chosen, True)
    return mask_from_keep(tokens, keep, n_keep)


def num_predicted(num_masked: int, ratio: float) -> int:
    """Masked patches reconstructed per sample: ``round(ratio * num_masked)``, at least 1 (0 when none is masked)."""
    return max(1, round(ratio * num_masked)) if num_masked else 0


def sample_predicted(
    mask: torch.Tensor, ratio: float, generator: torch.Generator | None = None, n_masked: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose a random subset of the masked patches of each sample, the same number in every sample.

    Used by the cross-attention decoder (CrossMAE), which reconstructs only some of the masked patches.
    The subset is drawn with ``torch.multinomial`` without replacement, uniformly among the masked
    patches, on the mask's device; ``ratio=1`` takes every masked patch without drawing (``generator``
    is then not advanced).

    Args:
        mask: ``(B, N)``, 1 = masked; every row must mask the same number of patches.
        ratio: fraction of the masked patches to keep, in ``(0, 1]``; ``M = num_predicted(n_masked, ratio)``.
        generator: optional ``torch.Generator`` on the mask's device, for reproducible draws.
        n_masked: the number of masked patches per row, when known (``MaskingResult.masked_indices.shape[1]``).
            None (default) counts it from ``mask`` and checks that the rows agree: a host read of ``mask``.

    Returns:
        ``indices (B, M)`` ascending, and ``predicted (B, N)`` in ``mask``'s dtype: 1 at those patches only.

    Raises:
        ValueError: for a ratio outside ``(0, 1]`` or (when ``n_masked`` is None) rows masking different
            numbers of patches.

    Examples::

        >>> r = random_masking(torch.randn(2, 16, 8), 0.75)
        >>> indices, predicted = sample_predicted(r.mask, 0.25, n_masked=r.masked_indices.shape[1])
        >>> indices.shape, predicted.sum(1).tolist(), bool((predicted <= r.mask).all())
        (torch.Size([2, 3]), [3.0, 3.0], True)
    """
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"decoder_predict_ratio must be in (0, 1], got {ratio}.")
    masked = mask > 0.5  # (B, N)
    batch, n_tokens = masked.shape
    if n_masked is None:
        n_masked = _row_count(masked, "mask the same number of patches")
    n_pred = num_predicted(n_masked, ratio)
    if n_pred == n_masked:
        indices = split_indices(masked, n_masked)[0]  # grid order
    else:
        chosen = torch.multinomial(masked.float(), n_pred, replacement=False, generator=generator)  # (B, M)
        indices = chosen.sort(dim=1).values
    predicted = torch.zeros(batch, n_tokens, dtype=mask.dtype, device=mask.device).scatter_(1, indices, 1)
    return indices, predicted


def patch_foreground_fraction(
    images: torch.Tensor, patch_size: Sequence[int] | int, threshold: float = 0.0
) -> torch.Tensor:
    """Fraction of voxels above ``threshold`` in each patch (any channel counts).

    Args:
        images: ``(B, C, *S)``.
        patch_size: per-axis patch size.
        threshold: intensity above which a voxel is foreground (e.g. 0.05 after a CT window scaled to [0, 1]).

    Returns:
        ``(B, N)`` float in ``[0, 1]``.
    """
    foreground = (images > threshold).any(dim=1, keepdim=True).float()  # (B, 1, *S)
    return patchify(foreground, patch_size).mean(dim=-1)


def content_aware_weights(
    images: torch.Tensor, patch_size: Sequence[int] | int, threshold: float = 0.05, strength: float = 4.0
) -> torch.Tensor:
    """Keep-weights for :func:`random_masking` that steer the masks onto tissue rather than air.

    ``w = 1 + strength * (1 - foreground_fraction)``: an all-air patch is ``1 + strength`` times as
    likely to stay visible as an all-tissue one, so the masked set, where the loss is computed, holds
    more anatomy. ``strength=0`` gives uniform masking.

    Args:
        images: ``(B, C, *S)``.
        patch_size: per-axis patch size.
        threshold: foreground intensity threshold, see :func:`patch_foreground_fraction`.
        strength: how strongly air is kept visible; must be >= 0.

    Returns:
        ``(B, N)`` positive weights.

    Raises:
        ValueError: for a negative ``strength``.
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}.")
    return 1.0 + strength * (1.0 - patch_foreground_fraction(images, patch_size, threshold))


def mae_patchify_and_mask(
    images: torch.Tensor,
    patch_size: Sequence[int] | int = 16,
    mask_ratio: float = 0.75,  # public name, kept (docs/library.md); elsewhere the package says masking_ratio
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patchify and mask in one call.

    Args:
        images: ``(B, C, H, W)`` or ``(B, C, H, W, D)``.
        patch_size: per-axis patch size. Defaults to 16.
        mask_ratio: fraction masked. Defaults to 0.75.
        generator: optional generator for reproducible masks.

    Returns:
        ``(visible_patches (B, N_keep, prod(P) * C), masked_indices (B, N - N_keep), permutation (B, N))``;
        ``permutation[:, :N_keep]`` are the indices of ``visible_patches`` in order, the rest are
        ``masked_indices``; :func:`restore_patches` puts every patch back.

    Examples::

        >>> v, m, p = mae_patchify_and_mask(torch.randn(10, 3, 224, 224), 16, 0.75)
        >>> v.shape, m.shape, p.shape
        (torch.Size([10, 49, 768]), torch.Size([10, 147]), torch.Size([10, 196]))
    """
    result = random_masking(patchify(images, patch_size), mask_ratio, generator=generator)
    permutation = torch.cat([result.visible_indices, result.masked_indices], dim=1)  # (B, N)
    return result.visible, result.masked_indices, permutation


def restore_patches(
    visible_patches: torch.Tensor, permutation: torch.Tensor, masked_patches: torch.Tensor | None = None
) -> torch.Tensor:
    """Put patches back in grid order: the inverse of the gather in :func:`mae_patchify_and_mask`.

    Args:
        visible_patches: ``(B, N_keep, D)``.
        permutation: ``(B, N)``, visible indices first.
        masked_patches: optional ``(B, N - N_keep, D)`` values for the masked slots (e.g. predictions);
            zeros when omitted.

    Returns:
        ``(B, N, D)`` patches in grid order.
    """
    batch, n_keep, width = visible_patches.shape
    n_tokens = permutation.shape[1]
    if masked_patches is None:
        masked_patches = visible_patches.new_zeros(batch, n_tokens - n_keep, width)
    ordered = torch.cat([visible_patches, masked_patches], dim=1)  # (B, N, D) in permutation order
    index = permutation.unsqueeze(-1).expand(-1, -1, width)
    return torch.empty_like(ordered).scatter_(1, index, ordered)


class MaskGenerator:
    """SimMIM-style random masks on a coarser grid than the model's patches, in 2D and 3D.

    A mask patch covers ``mask_patch_size // model_patch_size`` model patches per axis; a fixed
    number ``ceil(G * mask_ratio)`` of the ``G`` coarse cells is masked per sample. With
    ``tube_axis`` (3D only) one 2D mask is drawn and repeated along that axis (tube masking).

    Args:
        input_size: image spatial size ``S``.
        mask_patch_size: coarse mask cell, a multiple of ``model_patch_size`` on every axis.
        model_patch_size: the network's patch size ``P``.
        mask_ratio: fraction of coarse cells masked, in ``[0, 1)``; stored as ``masking_ratio``.
        spatial_dims: 2 or 3.
        tube_axis: ``None`` or the spatial axis (0, 1 or 2) along which a 3D mask is constant.

    Raises:
        ValueError: sizes that do not divide, a bad ratio, a bad ``tube_axis``.

    Examples::

        >>> gen = MaskGenerator(96, 32, 16, 0.75, spatial_dims=3)
        >>> tokens, voxels = gen(batch_size=2)
        >>> tokens.shape, voxels.shape
        (torch.Size([2, 216]), torch.Size([2, 96, 96, 96]))
    """

    def __init__(
        self,
        input_size: Sequence[int] | int,
        mask_patch_size: Sequence[int] | int,
        model_patch_size: Sequence[int] | int,
        mask_ratio: float = 0.6,  # public name, kept (docs/library.md); stored as masking_ratio
        spatial_dims: int = 3,
        tube_axis: int | None = None,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        if tube_axis is not None and (spatial_dims != 3 or tube_axis not in (0, 1, 2)):
            raise ValueError(f"tube_axis must be None or 0, 1, 2 for 3D masks, got {tube_axis} with {spatial_dims}D.")
        self.input_size = tuple(ensure_tuple_rep(input_size, spatial_dims))
        self.mask_patch_size = tuple(ensure_tuple_rep(mask_patch_size, spatial_dims))
        self.model_patch_size = tuple(ensure_tuple_rep(model_patch_size, spatial_dims))
        self.coarse_grid = patch_grid(self.input_size, self.mask_patch_size, name="input_size")
        self.scale = patch_grid(self.mask_patch_size, self.model_patch_size, name="mask_patch_size")
        self.token_grid = patch_grid(self.input_size, self.model_patch_size, name="input_size")
        self.masking_ratio = float(mask_ratio)
        self.spatial_dims = spatial_dims
        self.tube_axis = tube_axis

    def __call__(
        self, batch_size: int = 1, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` masks.

        Returns:
            ``(token_mask (B, N), voxel_mask (B, *S))``, both float with 1 = masked; ``N = prod(S // P)``
            in the row-major token order of :func:`~monai_mae.networks.patching.patchify`.
        """
        drawn = list(self.coarse_grid)
        if self.tube_axis is not None:
            drawn[self.tube_axis] = 1
        n_cells = math.prod(drawn)
        n_masked = math.ceil(n_cells * self.masking_ratio)
        weights = torch.ones(batch_size, n_cells, device=device)
        mask = torch.zeros(batch_size, n_cells, device=device)
        if n_masked > 0:
            chosen = torch.multinomial(weights, n_masked, replacement=False, generator=generator)
            mask.scatter_(1, chosen, 1.0)
        coarse = mask.view(batch_size, *drawn)
        if self.tube_axis is not None:
            coarse = coarse.expand(batch_size, *self.coarse_grid)
        tokens = coarse
        for axis, factor in enumerate(self.scale):
            tokens = tokens.repeat_interleave(factor, dim=axis + 1)  # (B, *token_grid)
        voxels = tokens
        for axis, factor in enumerate(self.model_patch_size):
            voxels = voxels.repeat_interleave(factor, dim=axis + 1)  # (B, *S)
        return tokens.reshape(batch_size, -1), voxels.contiguous()
