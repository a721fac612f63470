from __future__ import annotations

import pytest
import torch

from monai_mae import patchify, unpatchify

CASES = [
    # (image shape, patch size, expected token shape)
    ((2, 3, 32, 48), (16, 8), (2, 2 * 6, 16 * 8 * 3)),
    ((2, 1, 32, 32), 16, (2, 4, 256)),
    ((2, 2, 32, 32, 16), (16, 16, 8), (2, 8, 16 * 16 * 8 * 2)),
    ((1, 1, 24, 12, 6), (4, 3, 2), (1, 6 * 4 * 3, 24)),
    ((3, 4, 16, 16, 16), 8, (3, 8, 8 * 8 * 8 * 4)),
]


@pytest.mark.parametrize("shape, patch, expected", CASES)
def test_shape_and_round_trip(shape, patch, expected):
    images = torch.randn(shape)
    tokens = patchify(images, patch)
    assert tokens.shape == expected
    restored = unpatchify(tokens, patch, shape[2:], in_channels=shape[1])
    assert torch.equal(restored, images)


def test_layout_matches_design_3d():
    # tokens run over the grid row-major; inside a patch over (p1, p2, p3) then channel last
    b, c, (h, w, d), (p1, p2, p3) = 2, 3, (4, 6, 4), (2, 3, 2)
    images = torch.randn(b, c, h, w, d)
    tokens = patchify(images, (p1, p2, p3))
    gw, gd = w // p2, d // p3
    for bi in range(b):
        for x in range(h):
            for y in range(w):
                for z in range(d):
                    for ch in range(c):
                        n = ((x // p1) * gw + (y // p2)) * gd + z // p3
                        k = (((x % p1) * p2 + y % p2) * p3 + z % p3) * c + ch
                        assert tokens[bi, n, k] == images[bi, ch, x, y, z]


def test_layout_matches_design_2d():
    images = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    tokens = patchify(images, 2)
    # first patch, channel last: (0,0,c0), (0,0,c1), (0,1,c0), ...
    assert tokens[0, 0].tolist() == [0.0, 16.0, 1.0, 17.0, 4.0, 20.0, 5.0, 21.0]
    assert tokens[0, 1, 0].item() == images[0, 0, 0, 2].item()


def test_not_divisible_names_axis():
    with pytest.raises(ValueError, match="spatial axis 1 has size 30"):
        patchify(torch.zeros(1, 1, 32, 30, 32), 16)


@pytest.mark.parametrize("shape", [(1, 32, 32), (1, 1, 1, 8, 8, 8)])
def test_wrong_number_of_dims(shape):
    with pytest.raises(ValueError, match="dimensions"):
        patchify(torch.zeros(shape), 4)


def test_patch_size_length_mismatch():
    with pytest.raises(ValueError, match="has 2 entries"):
        patchify(torch.zeros(1, 1, 8, 8, 8), (4, 4))


def test_unpatchify_checks_token_count():
    with pytest.raises(ValueError, match=r"expected \(B, 8, 64\)"):
        unpatchify(torch.zeros(1, 7, 64), 4, (8, 8, 8))
