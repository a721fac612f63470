from __future__ import annotations

import pytest
import torch

from monai_mae import MaskedReconstructionLoss, masked_input, patchify, reconstruct_image, unpatchify
from monai_mae.losses import check_visible_weight, normalize_patches


def _mask(b, n, masked):
    mask = torch.zeros(b, n)
    mask[:, masked] = 1.0
    return mask


def test_value_is_mse_over_masked_patches_only():
    images = torch.randn(2, 1, 16, 16, 16)
    target = patchify(images, 8)
    pred = torch.randn_like(target)
    mask = _mask(2, 8, [0, 3, 5])
    expected = ((pred - target) ** 2).mean(-1)[:, [0, 3, 5]].mean()
    loss_fn = MaskedReconstructionLoss(8, spatial_dims=3)
    assert loss_fn((pred, mask), images).item() == pytest.approx(expected.item(), rel=1e-6)
    changed = pred.clone()
    changed[:, [1, 2, 4, 6, 7]] += 100.0  # visible patches do not count
    assert loss_fn((changed, mask), images).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss_fn((target, mask), images).item() == 0.0


def test_visible_weight_adds_the_visible_patches_mse():
    images = torch.randn(2, 1, 16, 16, 16)
    target = patchify(images, 8)
    pred = torch.randn_like(target, requires_grad=True)
    mask = _mask(2, 8, [0, 3, 5])
    per_patch = ((pred.detach() - target) ** 2).mean(-1)
    masked, visible = per_patch[:, [0, 3, 5]].mean(), per_patch[:, [1, 2, 4, 6, 7]].mean()
    loss = MaskedReconstructionLoss(8, visible_weight=0.25)((pred, mask), images)
    assert loss.item() == pytest.approx((masked + 0.25 * visible).item(), rel=1e-6)
    loss.backward()
    assert pred.grad[:, [1, 2, 4, 6, 7]].abs().sum() > 0  # the visible predictions now get a gradient
    # weight 0 is the masked-only loss, bit for bit; an all-masked batch has no visible term
    assert torch.equal(MaskedReconstructionLoss(8, visible_weight=0.0)((pred, mask), images),
                       MaskedReconstructionLoss(8)((pred, mask), images))  # fmt: skip
    all_masked = torch.ones(2, 8)
    assert MaskedReconstructionLoss(8, visible_weight=1.0)((pred, all_masked), images).item() == pytest.approx(
        per_patch.mean().item(), rel=1e-6
    )


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "1", True, None])
def test_visible_weight_errors(bad):
    with pytest.raises(ValueError, match="visible_weight must be a number >= 0"):
        MaskedReconstructionLoss(8, visible_weight=bad)


def test_check_visible_weight_rejects_the_cross_decoder():
    assert check_visible_weight(0.5, "self") == 0.5
    assert check_visible_weight(0.0, "cross") == 0.0
    with pytest.raises(ValueError, match="visible_loss_weight=0.5 needs decoder_type='self'"):
        check_visible_weight(0.5, "cross")


def test_norm_pix_target():
    images = torch.rand(2, 2, 16, 16) * 5 + 3
    loss_fn = MaskedReconstructionLoss((4, 8), spatial_dims=2, norm_pix_loss=True)
    target = loss_fn.target(images)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(-1, unbiased=False), torch.ones(2, 8), atol=1e-3, rtol=0)
    assert loss_fn((target, torch.ones(2, 8)), images).item() == pytest.approx(0.0, abs=1e-10)


def test_shape_errors():
    loss_fn = MaskedReconstructionLoss(8)
    with pytest.raises(ValueError, match="do not match"):
        loss_fn((torch.zeros(1, 8, 100), torch.zeros(1, 8)), torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="3 spatial dimensions"):
        loss_fn((torch.zeros(1, 4, 64), torch.zeros(1, 4)), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"outputs=\(pred, mask\)"):
        loss_fn(torch.zeros(1, 8, 512), torch.zeros(1, 1, 16, 16, 16))


def test_reconstruct_image_round_trip_and_paste():
    images = torch.randn(2, 1, 16, 16, 16)
    target = patchify(images, 8)
    mask = _mask(2, 8, [1, 2])
    assert torch.equal(reconstruct_image(target, mask, images, 8), images)
    garbage = torch.full_like(target, 7.0)
    pasted = patchify(reconstruct_image(garbage, mask, images, 8, paste_visible=True), 8)
    assert torch.equal(pasted[:, [0, 3, 4, 5, 6, 7]], target[:, [0, 3, 4, 5, 6, 7]])
    assert bool((pasted[:, [1, 2]] == 7.0).all())


def test_reconstruct_image_undoes_norm_pix_with_visible_statistics():
    images = torch.randn(1, 1, 8, 8) * 3 + 10  # every patch has about mean 10, std 3
    pred = normalize_patches(patchify(images, 4))
    out = reconstruct_image(pred, _mask(1, 4, [0]), images, 4, norm_pix_loss=True)
    assert out.shape == images.shape
    assert out.mean().item() == pytest.approx(images.mean().item(), abs=1.0)
    assert out.std().item() == pytest.approx(images.std().item(), rel=0.3)


def test_masked_input():
    images = torch.ones(1, 2, 8, 8)
    out = masked_input(images, _mask(1, 4, [3]), 4)
    expected = torch.ones(1, 4, 32)
    expected[:, 3] = 0
    assert torch.equal(out, unpatchify(expected, 4, (8, 8), 2))


def test_visible_weight_follows_the_network_to_be_fine_tuned():
    from monai_mae.losses import VISIBLE_WEIGHT_FOR, visible_weight_for

    assert visible_weight_for("vitseg") == 1.0
    assert [visible_weight_for(a) for a in ("unetr", "unet", "dynunet", "segresnet")] == [0.0] * 4
    assert set(VISIBLE_WEIGHT_FOR) == set(__import__("monai_mae.networks.factory").networks.factory.ARCHITECTURES)
    with pytest.raises(ValueError, match="finetune_architecture='vit': expected one of vitseg, unetr"):
        visible_weight_for("vit")
