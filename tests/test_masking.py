from __future__ import annotations

import math

import pytest
import torch

from monai_mae import (
    MaskGenerator,
    content_aware_weights,
    mae_patchify_and_mask,
    patchify,
    random_masking,
    restore_patches,
)


@pytest.mark.parametrize("n_tokens", [16, 49, 216])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.33, 0.5, 0.75, 0.9])
def test_mask_ratio_exact(n_tokens, ratio):
    tokens = torch.randn(3, n_tokens, 5)
    r = random_masking(tokens, ratio)
    n_keep = int(n_tokens * (1 - ratio))
    assert r.visible.shape == (3, n_keep, 5)
    assert r.mask.dtype == torch.float32 and r.keep.dtype == torch.bool
    assert r.mask.sum(1).tolist() == [float(n_tokens - n_keep)] * 3
    assert torch.equal(r.keep, r.mask == 0)
    assert r.visible_indices.shape == (3, n_keep) and r.masked_indices.shape == (3, n_tokens - n_keep)
    assert r.visible.device == tokens.device and r.mask.device == tokens.device


def test_boolean_indexing_preserves_order():
    tokens = torch.arange(4 * 32, dtype=torch.float32).view(4, 32, 1).repeat(1, 1, 3)
    r = random_masking(tokens, 0.75)
    assert bool((r.visible_indices.diff(dim=1) > 0).all())
    expected = torch.gather(tokens, 1, r.visible_indices.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(r.visible, expected)
    all_idx = torch.cat([r.visible_indices, r.masked_indices], 1).sort(1).values
    assert torch.equal(all_idx, torch.arange(32).expand(4, 32))


def test_multinomial_selection_is_uniform():
    n_rows, n_tokens, n_keep = 4000, 16, 4
    r = random_masking(torch.zeros(n_rows, n_tokens, 1), 0.75)
    counts = r.keep.sum(0).float()
    expected = n_rows * n_keep / n_tokens  # 1000 per token
    sd = math.sqrt(n_rows * (n_keep / n_tokens) * (1 - n_keep / n_tokens))
    assert counts.sum().item() == n_rows * n_keep
    assert float((counts - expected).abs().max()) < 5 * sd


def test_weights_steer_selection():
    weights = torch.ones(2000, 8)
    weights[:, :4] = 0.0  # never kept
    weights[:, 4] = 20.0  # almost always kept
    r = random_masking(torch.zeros(2000, 8, 1), 0.75, weights=weights)
    assert r.keep[:, :4].sum() == 0
    assert r.keep[:, 4].float().mean() > 0.9


def test_generator_reproducible():
    tokens = torch.randn(2, 64, 3)
    a = random_masking(tokens, 0.75, generator=torch.Generator().manual_seed(7))
    b = random_masking(tokens, 0.75, generator=torch.Generator().manual_seed(7))
    c = random_masking(tokens, 0.75, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.keep, b.keep) and not torch.equal(a.keep, c.keep)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask_ratio=1.0), "mask_ratio must be in"),
        (dict(mask_ratio=-0.1), "mask_ratio must be in"),
        (dict(mask_ratio=0.99), "leaves no visible token"),
        (dict(mask_ratio=0.5, weights=torch.ones(2, 5)), "weights must be"),
        (dict(mask_ratio=0.5, weights=-torch.ones(2, 8)), "non-negative"),
        (dict(mask_ratio=0.5, weights=torch.tensor([[1.0] * 3 + [0.0] * 5] * 2)), "at least N_keep = 4"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_masking(torch.randn(2, 8, 3), **kwargs)


def test_mae_patchify_and_mask_2d():
    images = torch.randn(10, 3, 224, 224)
    visible, masked_indices, permutation = mae_patchify_and_mask(images, patch_size=16, mask_ratio=0.75)
    assert visible.shape == (10, 49, 768)
    assert masked_indices.shape == (10, 147) and permutation.shape == (10, 196)
    assert torch.equal(permutation.sort(1).values, torch.arange(196).expand(10, 196))
    assert torch.equal(permutation[:, 49:], masked_indices)
    patches = patchify(images, 16)
    masked = torch.gather(patches, 1, masked_indices.unsqueeze(-1).expand(-1, -1, 768))
    assert torch.equal(restore_patches(visible, permutation, masked), patches)
    # without the masked values the visible ones are still in place and the rest is zero
    partial = restore_patches(visible, permutation)
    keep = torch.zeros(10, 196, dtype=torch.bool).scatter_(1, permutation[:, :49], True)
    assert torch.equal(partial[keep], patches[keep]) and partial[~keep].abs().sum() == 0


def test_mae_patchify_and_mask_3d_anisotropic():
    images = torch.randn(2, 1, 32, 32, 16)
    visible, masked_indices, permutation = mae_patchify_and_mask(images, (16, 16, 8), 0.5)
    assert visible.shape == (2, 4, 2048) and masked_indices.shape == (2, 4)
    masked = torch.gather(patchify(images, (16, 16, 8)), 1, masked_indices.unsqueeze(-1).expand(-1, -1, 2048))
    assert torch.equal(restore_patches(visible, permutation, masked), patchify(images, (16, 16, 8)))


def test_content_aware_weights_move_masks_onto_tissue():
    images = torch.zeros(500, 1, 16, 16)
    images[:, :, :, 8:] = 1.0  # right half tissue
    weights = content_aware_weights(images, 4, threshold=0.5, strength=4.0)
    tissue = torch.zeros(4, 4, dtype=torch.bool)
    tissue[:, 2:] = True
    tissue = tissue.flatten()
    assert torch.equal(weights[0], torch.where(tissue, 1.0, 5.0))
    r = random_masking(patchify(images, 4), 0.5, weights=weights)
    masked_on_tissue = (r.mask * tissue).sum() / r.mask.sum()
    assert masked_on_tissue > 0.7  # uniform masking would give 0.5
    with pytest.raises(ValueError, match="strength"):
        content_aware_weights(images, 4, strength=-1.0)


@pytest.mark.parametrize(
    "input_size, mask_patch, model_patch, dims",
    [((32, 32), 8, 4, 2), ((32, 32, 32), 16, 8, 3), ((32, 32, 16), (16, 16, 8), (8, 8, 4), 3)],
)
def test_mask_generator(input_size, mask_patch, model_patch, dims):
    gen = MaskGenerator(input_size, mask_patch, model_patch, 0.6, spatial_dims=dims)
    tokens, voxels = gen(batch_size=3, generator=torch.Generator().manual_seed(0))
    n_tokens = math.prod(gen.token_grid)
    n_coarse = math.prod(gen.coarse_grid)
    per_cell = math.prod(gen.scale)
    assert gen.masking_ratio == 0.6  # the constructor's mask_ratio, under the package's one name for it
    assert tokens.shape == (3, n_tokens) and voxels.shape == (3, *input_size)
    assert tokens.sum(1).tolist() == [float(math.ceil(n_coarse * 0.6) * per_cell)] * 3
    # the voxel mask is the token mask spread over each model patch
    per_patch = patchify(voxels.unsqueeze(1), model_patch)
    assert torch.equal(per_patch.amax(-1), tokens) and torch.equal(per_patch.amin(-1), tokens)
    # the token mask is constant over each coarse cell
    cells = patchify(tokens.view(3, 1, *gen.token_grid), gen.scale)
    assert torch.equal(cells.amax(-1), cells.amin(-1))


def test_mask_generator_tube():
    gen = MaskGenerator((32, 32, 32), 8, 4, 0.5, spatial_dims=3, tube_axis=2)
    tokens, voxels = gen(batch_size=2)
    assert torch.equal(voxels, voxels[..., :1].expand_as(voxels))
    assert tokens.mean().item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_size=32, mask_patch_size=12, model_patch_size=4), "input_size"),
        (dict(input_size=32, mask_patch_size=8, model_patch_size=3), "mask_patch_size"),
        (dict(input_size=32, mask_patch_size=8, model_patch_size=4, mask_ratio=1.0), "mask_ratio"),
        (dict(input_size=32, mask_patch_size=8, model_patch_size=4, spatial_dims=2, tube_axis=0), "tube_axis"),
    ],
)
def test_mask_generator_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskGenerator(**{"spatial_dims": 3, **kwargs})
