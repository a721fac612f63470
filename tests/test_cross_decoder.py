"""The opt-in cross-attention decoder of ``MAEViT`` (``decoder_type="cross"``, CrossMAE) and
``decoder_predict_ratio``: shapes, which patches are predicted, query independence, gradients,
the default path, argument checks, reproducibility, encoder transfer."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.networks import eval_mode

from monai_mae import MAEViT, MaskedReconstructionLoss, load_mae_encoder, patchify
from monai_mae.model_file import network_spec
from monai_mae.networks.cross_decoder import CrossDecoderBlock
from monai_mae.networks.masking import num_predicted, random_masking, sample_predicted
from monai_mae.networks.vitseg import ViTSeg

TINY = dict(hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, decoder_hidden_size=24, decoder_mlp_dim=48,
            decoder_num_layers=2, decoder_num_heads=4)  # fmt: skip
PRIMUS = dict(pos_embed_type="rope", mlp_type="swiglu", layer_scale_init=0.1)


def _net(spatial_dims: int = 3, seed: int = 0, **options) -> MAEViT:
    torch.manual_seed(seed)
    return MAEViT(1, (32,) * spatial_dims, 8, spatial_dims=spatial_dims, decoder_type="cross", **TINY, **options)


def _images(spatial_dims: int = 3, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, *(32,) * spatial_dims, generator=torch.Generator().manual_seed(seed))


CASES = list(itertools.product([2, 3], [True, False], [{}, PRIMUS], [1.0, 0.25]))


@pytest.mark.parametrize("spatial_dims, cls_token, options, ratio", CASES)
def test_shapes_and_predicted_patches(spatial_dims, cls_token, options, ratio):
    net = _net(spatial_dims, cls_token=cls_token, decoder_predict_ratio=ratio, **options)
    images = _images(spatial_dims)
    n_tokens = 4**spatial_dims
    given = random_masking(patchify(images, 8), 0.75, generator=torch.Generator().manual_seed(1)).mask  # (B, N)
    pred, mask = net(images, mask=given)
    assert pred.shape == (2, n_tokens, 8**spatial_dims) and mask.shape == (2, n_tokens)
    n_masked = n_tokens - int(n_tokens * 0.25)
    assert mask.sum(1).tolist() == [float(round(ratio * n_masked))] * 2
    assert bool((mask <= given).all())  # only masked patches are predicted
    assert bool((pred[mask == 0] == 0).all()) and bool((pred[mask == 1] != 0).any(-1).all())
    loss = MaskedReconstructionLoss(8, spatial_dims=spatial_dims)((pred, mask), images)
    assert torch.isfinite(loss)


def test_eval_mode_predicts_every_masked_patch():
    net = _net(decoder_predict_ratio=0.25)
    generator = torch.Generator().manual_seed(2)
    with eval_mode(net):
        _, mask = net(_images(), generator=generator)
    assert mask.sum(1).tolist() == [48.0, 48.0]


def test_num_predicted_rounds_and_keeps_at_least_one():
    assert [num_predicted(48, r) for r in (1.0, 0.25, 0.5, 0.01)] == [48, 12, 24, 1]
    assert num_predicted(0, 0.5) == 0


def test_sample_predicted_subset_and_checks():
    mask = random_masking(torch.randn(3, 64, 2), 0.75).mask
    indices, predicted = sample_predicted(mask, 0.5)
    assert indices.shape == (3, 24) and bool((indices.diff(dim=1) > 0).all())  # ascending, distinct
    assert bool((predicted <= mask).all()) and predicted.sum(1).tolist() == [24.0] * 3
    assert torch.equal(predicted.gather(1, indices), torch.ones(3, 24))
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    indices, predicted = sample_predicted(mask, 1.0, generator=generator)  # every masked patch, no draw
    assert torch.equal(predicted, mask) and torch.equal(generator.get_state(), state)
    with pytest.raises(ValueError, match="decoder_predict_ratio"):
        sample_predicted(mask, 0.0)
    uneven = mask.clone()
    uneven[0, (uneven[0] == 0).nonzero()[0]] = 1
    with pytest.raises(ValueError, match="same number"):
        sample_predicted(uneven, 0.5)


@pytest.mark.parametrize("options", [{}, PRIMUS, dict(cls_token=False)])
def test_each_prediction_depends_only_on_its_own_query(options):
    net = _net(**options).eval()
    images = _images()
    masking = net.mask(patchify(images, 8), 0.75, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latent = net.forward_encoder_tokens(masking, net.grid_size)
        masked = masking.masked_indices  # (B, 48)
        first = net.forward_decoder(latent, masking.keep, net.grid_size, masked[:, :10])
        # replace one query's position by another masked patch: the other nine predictions do not change
        moved = torch.cat([masked[:, 20:21], masked[:, 1:10]], dim=1)
        second = net.forward_decoder(latent, masking.keep, net.grid_size, moved)
        alone = net.forward_decoder(latent, masking.keep, net.grid_size, masked[:, 5:6])
        every = net.forward_decoder(latent, masking.keep, net.grid_size)  # all masked patches
    rows = torch.arange(2)[:, None]
    torch.testing.assert_close(second[rows, masked[:, 1:10]], first[rows, masked[:, 1:10]], rtol=0, atol=1e-6)
    torch.testing.assert_close(alone[rows, masked[:, 5:6]], first[rows, masked[:, 5:6]], rtol=0, atol=1e-6)
    torch.testing.assert_close(every[rows, masked[:, :10]], first[rows, masked[:, :10]], rtol=0, atol=1e-6)
    assert not torch.allclose(second[rows, masked[:, 20:21]], first[rows, masked[:, :1]])


@pytest.mark.parametrize("options", [{}, PRIMUS])
def test_gradients_reach_encoder_and_only_predicted_patches(options):
    net = _net(decoder_predict_ratio=0.5, **options)
    images = _images().requires_grad_(True)
    pred, mask = net(images)
    pred.retain_grad()
    MaskedReconstructionLoss(8)((pred, mask), images.detach()).backward()
    grad_per_patch = pred.grad.abs().sum(-1)
    assert bool((grad_per_patch[mask == 0] == 0).all()) and bool((grad_per_patch[mask == 1] > 0).all())
    for name in ("patch_embedding.patch_embeddings.weight", "blocks.0.attn.qkv.weight", "norm.weight",
                 "decoder_embed.weight", "mask_tokens", "decoder_blocks.0.attn.q.weight",
                 "decoder_blocks.1.attn.kv.weight", "decoder_pred.weight"):  # fmt: skip
        assert net.get_parameter(name).grad.abs().sum() > 0, name
    assert bool((patchify(images.grad, 8).abs().sum(-1)[mask == 1] == 0).all())  # the encoder sees no masked voxel


def test_activation_checkpointing_same_gradients():
    plain, ckpt = _net(**PRIMUS), _net(activation_checkpointing=True, **PRIMUS)
    ckpt.load_state_dict(plain.state_dict())
    images = _images()
    for net in (plain, ckpt):
        pred, mask = net(images, generator=torch.Generator().manual_seed(4))
        MaskedReconstructionLoss(8)((pred, mask), images).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_default_decoder_is_unchanged():
    torch.manual_seed(0)
    default = MAEViT(1, 32, 8, **TINY)
    torch.manual_seed(0)
    explicit = MAEViT(1, 32, 8, decoder_type="self", decoder_predict_ratio=1.0, **TINY)
    cross = _net()
    assert list(default.state_dict()) == list(explicit.state_dict())
    images = _images()
    outputs = [net(images, generator=torch.Generator().manual_seed(5)) for net in (default, explicit)]
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    # the cross decoder differs only inside decoder_blocks
    outside = lambda net: [k for k in net.state_dict() if not k.startswith("decoder_blocks.")]  # noqa: E731
    assert outside(default) == outside(cross)
    assert all(isinstance(block, CrossDecoderBlock) for block in cross.decoder_blocks)


def test_state_dict_round_trip_and_model_description():
    net = _net(decoder_predict_ratio=0.25, **PRIMUS)
    spec = network_spec(net)
    assert spec["decoder_type"] == "cross" and spec["decoder_predict_ratio"] == 0.25
    rebuilt = MAEViT(**{k: v for k, v in spec.items() if k != "_target_"})
    rebuilt.load_state_dict(net.state_dict())  # strict
    images = _images()
    with eval_mode(net, rebuilt):
        a = net(images, generator=torch.Generator().manual_seed(6))
        b = rebuilt(images, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_generator_reproducibility():
    net = _net(decoder_predict_ratio=0.25)
    images = _images()
    runs = [net(images, generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])


def test_encoder_transfers_into_vitseg():
    mae = _net(cls_token=False, **PRIMUS)
    seg = ViTSeg(1, 2, 32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, **PRIMUS)
    report = load_mae_encoder(seg, mae, verbose=False)
    assert report.missing == [] and report.skipped == []
    assert any(key.startswith("decoder_blocks.") for key in report.ignored) and "mask_tokens" in report.ignored
    images = _images()
    with eval_mode(mae, seg):
        assert torch.equal(seg.forward_features(images)[0], mae.forward_encoder(images))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(decoder_type="crossmae"), "decoder_type"),
        (dict(decoder_type="cross", decoder_predict_ratio=0.0), "decoder_predict_ratio"),
        (dict(decoder_type="cross", decoder_predict_ratio=1.5), "decoder_predict_ratio"),
        (dict(decoder_type="cross", decoder_predict_ratio=True), "decoder_predict_ratio"),
        (dict(decoder_type="cross", decoder_predict_ratio="0.5"), "decoder_predict_ratio"),
        (dict(decoder_predict_ratio=0.5), "decoder_type='cross'"),
    ],
)
def test_bad_arguments(options, match):
    with pytest.raises(ValueError, match=match):
        MAEViT(1, 32, 8, **{**TINY, **options})


def test_predict_needs_the_cross_decoder():
    net = MAEViT(1, 32, 8, **TINY)
    masking = net.mask(patchify(_images(), 8), 0.75)
    latent = net.forward_encoder_tokens(masking, net.grid_size)
    with pytest.raises(ValueError, match="decoder_type='cross'"):
        net.forward_decoder(latent, masking.keep, net.grid_size, masking.masked_indices)


@pytest.mark.parametrize("options", [{}, PRIMUS])
def test_bf16_autocast_forward_backward(options):
    net = _net(decoder_predict_ratio=0.5, **options)
    images = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred, mask = net(images)
        loss = MaskedReconstructionLoss(8)((pred, mask), images)
    loss.backward()
    assert torch.isfinite(loss) and mask.sum(1).tolist() == [24.0, 24.0]
    assert net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
