from __future__ import annotations

import itertools

import pytest
import torch
from monai.networks import eval_mode
from monai.networks.blocks import PatchEmbeddingBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.nets import MaskedAutoEncoderViT, ViT

from monai_mae import MAEViT, MaskedReconstructionLoss, MaskGenerator, patchify
from monai_mae.networks.masking import random_masking
from monai_mae.networks.pos_embed import sincos_pos_embed

TINY = dict(hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, decoder_hidden_size=24, decoder_mlp_dim=48,
            decoder_num_layers=1, decoder_num_heads=4)  # fmt: skip


# ---------------------------------------------------------------- MONAI's own test contract
MONAI_SHAPE_CASES = []
for img, pos, proj, nd in itertools.product([96, 128], ["sincos", "learnable"], ["conv", "perceptron"], [2, 3]):
    params = dict(masking_ratio=0.5, dropout_rate=0.6, in_channels=4, hidden_size=768, num_heads=12, mlp_dim=3072,
                  num_layers=4, decoder_hidden_size=384, decoder_mlp_dim=512, decoder_num_layers=4,
                  decoder_num_heads=16, pos_embed_type=pos, decoder_pos_embed_type=pos, proj_type=proj,
                  img_size=(img,) * nd, patch_size=(16,) * nd, spatial_dims=nd)  # fmt: skip
    MONAI_SHAPE_CASES.append((params, (2, 4, *(img,) * nd), (2, (img // 16) ** nd, 4 * 16**nd)))


@pytest.mark.parametrize("params, input_shape, expected", MONAI_SHAPE_CASES)
def test_monai_contract_shape(params, input_shape, expected):
    net = MAEViT(**params)
    with eval_mode(net):
        pred, mask = net(torch.randn(input_shape))
    assert pred.shape == expected
    assert mask.shape == expected[:2] and mask.sum(1).tolist() == [expected[1] // 2] * 2


MONAI_ILL_ARGS = [
    {"in_channels": 1, "img_size": (128, 128, 128), "patch_size": (16, 16, 16), "dropout_rate": 5.0},
    {"in_channels": 1, "img_size": (128, 128, 128), "patch_size": (64, 64, 64), "pos_embed_type": "sin"},
    {"in_channels": 1, "img_size": (128, 128, 128), "patch_size": (64, 64, 64), "decoder_pos_embed_type": "sin"},
    {"in_channels": 1, "img_size": (32, 32, 32), "patch_size": (64, 64, 64)},
    {"in_channels": 1, "img_size": (128, 128, 128), "patch_size": (64, 64, 64), "num_layers": 12, "num_heads": 14},
    {"in_channels": 1, "img_size": (97, 97, 97), "patch_size": (16, 16, 16)},
    {"in_channels": 1, "img_size": (128, 128, 128), "patch_size": (64, 64, 64), "masking_ratio": 1.1},
    {"in_channels": 1, "img_size": (128, 128, 128), "patch_size": (64, 64, 64), "masking_ratio": -0.1},
]


@pytest.mark.parametrize("params", MONAI_ILL_ARGS)
def test_monai_contract_ill_args(params):
    with pytest.raises(ValueError):
        MAEViT(**params)


def test_monai_contract_frozen_decoder_pos_embedding():
    net = MAEViT(in_channels=1, img_size=(96, 96, 96), patch_size=(16, 16, 16))
    assert net.decoder_pos_embedding.requires_grad is False


def test_monai_contract_attention_matrix():
    shape = (1, 1, 96, 96, 96)
    plain = MAEViT(in_channels=1, img_size=96, patch_size=16)
    plain(torch.randn(shape))
    assert isinstance(plain.blocks[0].attn.att_mat, torch.Tensor) and plain.blocks[0].attn.att_mat.nelement() == 0
    saving = MAEViT(in_channels=1, img_size=96, patch_size=16, save_attn=True)
    saving(torch.randn(shape))
    assert saving.blocks[0].attn.att_mat.shape == (1, 12, 55, 55)


@pytest.mark.parametrize("ratio", [0.25, 0.33])
def test_monai_contract_masking_ratio(ratio):
    net = MAEViT(in_channels=1, img_size=96, patch_size=16, masking_ratio=ratio, save_attn=True, num_layers=1)
    net(torch.randn(1, 1, 96, 96, 96))
    assert net.blocks[0].attn.att_mat.shape[-1] - 1 == int(216 * (1 - ratio))


# ---------------------------------------------------------------- MONAI weights and outputs
@pytest.mark.parametrize("nd, proj", [(2, "conv"), (2, "perceptron"), (3, "conv"), (3, "perceptron")])
def test_loads_monai_state_dict_and_matches_output(nd, proj):
    args = dict(in_channels=2, img_size=(32,) * nd, patch_size=(8,) * nd, proj_type=proj, spatial_dims=nd,
                qkv_bias=True, **TINY)  # fmt: skip
    if nd == 3:
        args.update(hidden_size=48, decoder_hidden_size=24)
    ref, ours = MaskedAutoEncoderViT(**args), MAEViT(**args)
    ours.load_state_dict(ref.state_dict())  # strict: every key maps
    x = torch.randn(2, 2, *(32,) * nd)
    with eval_mode(ref, ours):
        ref_pred, ref_mask = ref(x)
        pred, mask = ours(x, mask=ref_mask)
    assert torch.equal(mask, ref_mask.float())
    torch.testing.assert_close(pred, ref_pred, rtol=1e-4, atol=1e-5)


def test_monai_old_cross_attn_keys_dropped():
    ref = MaskedAutoEncoderViT(1, (32, 32), (16, 16), spatial_dims=2, **TINY)
    state = ref.state_dict()
    state["blocks.0.cross_attn.to_q.weight"] = torch.randn(48, 48)
    state["decoder_blocks.0.cross_attn.out_proj.weight"] = torch.randn(24, 24)
    MAEViT(1, (32, 32), (16, 16), spatial_dims=2, **TINY).load_state_dict(state)


def test_encoder_weights_load_into_monai_vit():
    net = MAEViT(1, 32, 8, **TINY)
    encoder = {k: v for k, v in net.state_dict().items() if k.split(".")[0] in ("patch_embedding", "blocks", "norm")}
    ViT(1, 32, 8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4).load_state_dict(encoder, strict=True)
    # with its class token too, MONAI's ViT computes exactly our encoder features
    vit = ViT(1, 32, 8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, classification=True)
    vit.load_state_dict({**encoder, "cls_token": net.cls_token}, strict=False)
    x = torch.randn(1, 1, 32, 32, 32)
    with eval_mode(net, vit):
        ours = net.forward_encoder(x)
        _, hidden = vit(x)
    torch.testing.assert_close(ours, vit.norm(hidden[-1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("proj", ["conv", "perceptron"])
def test_visible_projection_equals_projecting_all(proj):
    net = MAEViT(3, (16, 24, 8), (4, 8, 2), proj_type=proj, **TINY)
    block = PatchEmbeddingBlock(3, (16, 24, 8), (4, 8, 2), 48, 4, proj_type=proj, pos_embed_type="sincos")
    block.load_state_dict(net.patch_embedding.state_dict())
    x = torch.randn(2, 3, 16, 24, 8)
    r = random_masking(patchify(x, (4, 8, 2)), 0.75)
    with eval_mode(net, block):
        visible = net.patch_embedding(r.visible, r.keep, net.grid_size)
        everything = block(x)  # MONAI: project all, add position
    torch.testing.assert_close(visible, everything[r.keep].view_as(visible), rtol=1e-5, atol=1e-5)


def test_fused_attention_by_default_and_same_result():
    fused = MAEViT(1, 32, 8, **TINY)
    assert fused.blocks[0].attn.use_flash_attention and fused.decoder_blocks[0].attn.use_flash_attention
    plain = MAEViT(1, 32, 8, save_attn=True, **TINY)
    assert not plain.blocks[0].attn.use_flash_attention
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(fused(x, generator=gen_a), plain(x, generator=gen_b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(use_flash_attention=True, save_attn=True), "save_attn"),
        (dict(use_flash_attention=True, dropout_rate=0.1), "dropout_rate=0"),
        (dict(spatial_dims=4), "spatial_dims"),
        (dict(in_channels=0), "in_channels"),
        (dict(proj_type="linear"), "linear"),
    ],
)
def test_extra_ill_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAEViT(**{"in_channels": 1, "img_size": 32, "patch_size": 8, **TINY, **kwargs})


# ---------------------------------------------------------------- better than MONAI
@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 2, 32, 32, 32), "expects 1 input channel"),
        ((1, 1, 32, 32), r"expects input \(B, C, H, W, D\)"),
        ((1, 1, 32, 30, 32), "spatial axis 1 has size 30"),
    ],
)
def test_bad_input_shape(shape, match):
    with pytest.raises(ValueError, match=match):
        MAEViT(1, 32, 8, **TINY)(torch.randn(shape))


@pytest.mark.parametrize(
    "ratio, match",
    [
        (1.0, r"masking_ratio must be in \[0, 1\), got 1.0"),
        (0.999, "masking_ratio 0.999 leaves no visible token out of 64"),
    ],
)
def test_bad_masking_ratio_per_call(ratio, match):
    with pytest.raises(ValueError, match=match):
        MAEViT(1, 32, 8, **TINY)(torch.randn(1, 1, 32, 32, 32), masking_ratio=ratio)


@pytest.mark.parametrize("pos", ["sincos", "learnable"])
def test_other_input_size(pos):
    net = MAEViT(1, (32, 32, 32), (8, 8, 8), pos_embed_type=pos, decoder_pos_embed_type=pos, **TINY)
    pred, mask = net(torch.randn(2, 1, 48, 32, 16))
    assert pred.shape == (2, 6 * 4 * 2, 512) and mask.shape == (2, 48)
    # the same grid reuses the stored table unchanged
    assert net.patch_embedding.pos_embed((4, 4, 4)) is net.patch_embedding.position_embeddings
    if pos == "sincos":
        assert torch.equal(net.patch_embedding.pos_embed((6, 4, 2)), sincos_pos_embed((6, 4, 2), 48))


@pytest.mark.parametrize("grid, width", [((4, 6), 64), ((3, 4, 5), 96), ((4, 4, 4), 768)])
def test_sincos_matches_monai_where_defined(grid, width):
    torch.testing.assert_close(
        sincos_pos_embed(grid, width), build_sincos_position_embedding(list(grid), width, len(grid)).data
    )


@pytest.mark.parametrize("width", [40, 50, 64, 101])
def test_sincos_any_width(width):
    table = sincos_pos_embed((3, 4, 5), width)
    assert table.shape == (1, 60, width)
    assert torch.unique(table[0], dim=0).shape[0] == 60  # every position distinct
    net = MAEViT(1, 32, 8, hidden_size=width if width % 2 == 0 else 100, num_heads=2, num_layers=1,
                 decoder_hidden_size=64, decoder_num_heads=4, decoder_num_layers=1)  # fmt: skip
    assert net(torch.randn(1, 1, 32, 32, 32))[0].shape == (1, 64, 512)


def test_forward_encoder_features():
    net = MAEViT(1, 32, 8, **TINY).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    feats = net.forward_encoder(x)
    assert feats.shape == (2, 1 + 64, 48)
    assert torch.equal(feats, net.forward_encoder(x))  # no randomness at ratio 0
    assert net.forward_encoder(x, masking_ratio=0.75).shape == (2, 1 + 16, 48)


def test_generator_and_given_mask():
    net = MAEViT(1, 32, 8, **TINY)
    x = torch.randn(2, 1, 32, 32, 32)
    _, m1 = net(x, generator=torch.Generator().manual_seed(3))
    _, m2 = net(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2)
    token_mask, _ = MaskGenerator(32, 16, 8, 0.5)(batch_size=2)
    _, m3 = net(x, mask=token_mask)
    assert torch.equal(m3, token_mask)


def test_gradients_reach_only_what_they_should():
    net = MAEViT(1, 32, 8, **TINY)
    x = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    pred, mask = net(x)
    pred.retain_grad()
    MaskedReconstructionLoss(8)((pred, mask), x.detach()).backward()
    # the loss sees masked patches only
    grad_per_patch = pred.grad.abs().sum(-1)
    assert bool((grad_per_patch[mask == 0] == 0).all()) and bool((grad_per_patch[mask == 1] > 0).all())
    # the encoder never sees masked input voxels
    input_grad = patchify(x.grad, 8).abs().sum(-1)
    assert bool((input_grad[mask == 1] == 0).all()) and bool((input_grad[mask == 0] > 0).all())
    # fixed tables get no gradient; learnt tokens do
    assert net.patch_embedding.position_embeddings.grad is None and net.decoder_pos_embedding.grad is None
    assert net.mask_tokens.grad.abs().sum() > 0 and net.cls_token.grad.abs().sum() > 0


def test_activation_checkpointing_same_gradients():
    x = torch.randn(1, 1, 32, 32, 32)
    plain = MAEViT(1, 32, 8, **TINY)
    ckpt = MAEViT(1, 32, 8, activation_checkpointing=True, **TINY)
    ckpt.load_state_dict(plain.state_dict())
    loss_fn = MaskedReconstructionLoss(8)
    for net in (plain, ckpt):
        loss_fn(net(x, generator=torch.Generator().manual_seed(0)), x).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # hundreds of optimizer steps
@pytest.mark.parametrize("nd", [2, 3])
def test_overfits_one_volume(nd):
    torch.manual_seed(0)
    size, patch = (32,) * nd, (8,) * nd
    coords = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij")
    radius = sum(c**2 for c in coords).sqrt()
    volume = ((radius < 0.7).float() + 0.5 * torch.sin(4 * coords[0])).view(1, 1, *size)
    net = MAEViT(1, size, patch, hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4, decoder_hidden_size=64,
                 decoder_mlp_dim=128, decoder_num_layers=2, decoder_num_heads=4, spatial_dims=nd)  # fmt: skip
    loss_fn = MaskedReconstructionLoss(patch, spatial_dims=nd)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    eval_gen = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    with torch.no_grad():
        start = loss_fn(net(volume, generator=eval_gen()), volume).item()
    for _ in range(150):
        loss = loss_fn(net(volume), volume)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = loss_fn(net(volume, generator=eval_gen()), volume).item()
    assert end < start / 10, (start, end)


# ---------------------------------------------------------------- CPU bfloat16 autocast
AUTOCAST_CASES = {
    "default": dict(),
    "primus": dict(pos_embed_type="rope", mlp_type="swiglu", layer_scale_init=0.1, cls_token=False),
    "rope_cls": dict(pos_embed_type="rope", qkv_bias=True),
    "perceptron_learnable": dict(
        proj_type="perceptron", pos_embed_type="learnable", decoder_pos_embed_type="learnable"
    ),
    "fourier_no_decoder_pos": dict(pos_embed_type="fourier", decoder_pos_embed_type="none"),
    "save_attn": dict(save_attn=True),
    "checkpointing_drop_path": dict(activation_checkpointing=True, drop_path_rate=0.1, mlp_type="swiglu"),
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("case", list(AUTOCAST_CASES))
def test_bf16_autocast_forward_backward(case, dims):
    """Training under ``torch.autocast("cpu", torch.bfloat16)`` runs with every option (no dtype error), gives
    float32 gradients to every trainable weight, and stays close to the float32 computation."""
    torch.manual_seed(20)
    size = (32,) * dims
    net = MAEViT(1, size, 8, spatial_dims=dims, **TINY, **AUTOCAST_CASES[case])
    x = torch.randn(2, 1, *size)
    n_tokens = 4**dims
    mask = torch.zeros(2, n_tokens)
    mask[:, torch.randperm(n_tokens)[: 3 * n_tokens // 4]] = 1.0
    loss_fn = MaskedReconstructionLoss(8, spatial_dims=dims)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred, out_mask = net(x, mask=mask)
        loss = loss_fn((pred, out_mask), x)
    assert pred.dtype == torch.bfloat16 and pred.shape == (2, n_tokens, 8**dims)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for name, param in net.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.dtype == torch.float32, name
            assert torch.isfinite(param.grad).all(), name
    net.eval()
    with torch.no_grad():
        reference = net(x, mask=mask)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, mask=mask)[0]
            features = net.forward_encoder(x)
    assert features.shape == (2, net.num_prefix_tokens + n_tokens, 48)
    assert (low.float() - reference).norm() / reference.norm() < 0.05
