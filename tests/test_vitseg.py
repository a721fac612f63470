"""Tests of ``ViTSeg`` and of what works with it: MAE encoder transfer, residual-stream scaling,
layer-wise learning rates with ``encoder_lr_scale``, ``encoder_parameters`` and ``FreezeEncoder``."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine
from monai.networks.nets import ViT

from monai_mae.engines.finetune import FreezeEncoder, encoder_parameters, layerwise_lr_groups
from monai_mae.networks.blocks import EncoderBlock
from monai_mae.networks.mae import MAEViT
from monai_mae.networks.patching import patchify
from monai_mae.networks.residual import match_residual_stream, rescale_residual_stream, residual_stream_norm
from monai_mae.networks.rope import grid_coordinates
from monai_mae.networks.transfer import load_mae_encoder
from monai_mae.networks.vitseg import ViTSeg, upsampling_strides

ENCODER = dict(hidden_size=24, mlp_dim=32, num_layers=2, num_heads=2, qkv_bias=True)
DECODER = dict(decoder_hidden_size=16, decoder_mlp_dim=16, decoder_num_layers=1, decoder_num_heads=2)
PRIMUS = dict(pos_embed_type="rope", mlp_type="swiglu", layer_scale_init=0.1)
POS = "patch_embedding.position_embeddings"


def vitseg(img_size=32, patch_size=8, spatial_dims=3, decoder_channels=(16, 8, 4), **kw) -> ViTSeg:
    args = dict(in_channels=1, out_channels=3, img_size=img_size, patch_size=patch_size, spatial_dims=spatial_dims,
                decoder_channels=decoder_channels, **ENCODER)  # fmt: skip
    return ViTSeg(**{**args, **kw})


def mae(img_size=32, patch_size=8, **kw) -> MAEViT:
    return MAEViT(**{**dict(in_channels=1, img_size=img_size, patch_size=patch_size, **ENCODER, **DECODER), **kw})


def randomize_(module: nn.Module, std: float = 0.2) -> nn.Module:
    """Add noise to every parameter (norm weights and biases, LayerScale, fixed tables too)."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * std)
    return module


def encoder_names(net: nn.Module) -> set[str]:
    return {n for n, _ in net.named_parameters() if n.startswith(("patch_embedding.", "blocks.", "norm.", "cls_token"))}


def block_output_norm(net: ViTSeg, x: torch.Tensor) -> float:
    """Mean token L2 norm over the outputs of every block, computed step by step."""
    grid = net.check_input(x)
    tokens = net.patch_embedding.embed_all(patchify(x, net.patch_size), grid)
    rope = net.rope(grid_coordinates(grid)) if net.rope is not None else None
    norms = []
    for block in net.blocks:
        tokens = block(tokens, rope)
        norms.append(tokens.double().norm(dim=-1).mean())
    return float(torch.stack(norms).mean())


# ------------------------------------------------------------------------------ upsampling_strides
@pytest.mark.parametrize(
    "patch, expected",
    [
        ((8, 8, 8), [(2, 2, 2)] * 3),
        ((8, 8, 4), [(2, 2, 2), (2, 2, 2), (2, 2, 1)]),
        ((4, 8, 2), [(2, 2, 2), (2, 2, 1), (1, 2, 1)]),
        ((16, 16), [(2, 2)] * 4),
        ((2, 8), [(2, 2), (1, 2), (1, 2)]),
        ((1, 1, 1), []),
        ((4, 1), [(2, 1), (2, 1)]),
        ([2, 2, 2], [(2, 2, 2)]),
    ],
)
def test_upsampling_strides(patch, expected):
    strides = upsampling_strides(patch)
    assert strides == expected
    # the strides multiply up to the patch size on every axis
    assert tuple(math.prod(s[i] for s in strides) for i in range(len(patch))) == tuple(patch)


@pytest.mark.parametrize("patch", [(6, 8, 8), (8, 8, 0), (3, 3), (8, 12), (-2, 2, 2)])
def test_upsampling_strides_not_power_of_two(patch):
    with pytest.raises(ValueError, match=r"power-of-2 patch sides .*got " + re.escape(str(tuple(patch)))):
        upsampling_strides(patch)


# ---------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(), (2, 1, 32, 32, 32)),  # cubic 8^3 patches
        (dict(img_size=(32, 32, 16), patch_size=(8, 8, 4)), (1, 1, 32, 32, 16)),  # anisotropic
        (dict(img_size=(32, 32, 16), patch_size=(8, 8, 4)), (1, 1, 16, 24, 8)),  # anisotropic, other size
        (dict(spatial_dims=2, img_size=(32, 32)), (2, 1, 32, 32)),  # 2D
        (dict(spatial_dims=2, img_size=(32, 32), patch_size=16, decoder_channels=(8, 8, 4, 4)), (1, 1, 48, 32)),
        (dict(), (1, 1, 40, 24, 32)),  # odd-but-divisible, not img_size
        (dict(pos_embed_type="rope"), (1, 1, 40, 24, 32)),
        (dict(pos_embed_type="learnable"), (1, 1, 40, 24, 32)),  # table interpolated
        (dict(pos_embed_type="fourier"), (1, 1, 16, 24, 8)),
        (dict(pos_embed_type="none", proj_type="perceptron"), (1, 1, 24, 16, 40)),
        (dict(spatial_dims=2, img_size=(16, 8), patch_size=(4, 1), decoder_channels=(8, 4)), (1, 1, 12, 5)),
        (dict(in_channels=2, out_channels=5, **PRIMUS, drop_path_rate=0.1), (2, 2, 32, 16, 24)),
    ],
)
def test_vitseg_output_shape(kwargs, shape):
    net = vitseg(**kwargs).eval()
    x = torch.randn(*shape)
    out = net(x)
    assert out.shape == (shape[0], net.out_channels, *shape[2:])
    assert torch.isfinite(out).all()
    features, grid = net.forward_features(x)
    assert grid == tuple(s // p for s, p in zip(shape[2:], net.patch_size))
    assert features.shape == (shape[0], math.prod(grid), ENCODER["hidden_size"])


def test_vitseg_defaults_and_structure():
    net = vitseg(decoder_channels=None)
    assert net.strides == [(2, 2, 2)] * 3
    convs = [stage[0] for stage in net.decoder]
    assert [c.out_channels for c in convs] == [128, 64, 32]
    assert [c.stride for c in convs] == [(2, 2, 2)] * 3
    assert net.head.in_channels == 32 and net.head.out_channels == 3
    assert net.num_tokens == 64 and net.grid_size == (4, 4, 4)
    assert all(isinstance(b, EncoderBlock) for b in net.blocks)
    assert net.rope is None
    assert vitseg(patch_size=(8, 8, 4), decoder_channels=None).strides[-1] == (2, 2, 1)
    assert [s[0].out_channels for s in vitseg(patch_size=2, decoder_channels=None).decoder] == [32]
    assert [s[0].out_channels for s in vitseg(patch_size=4, decoder_channels=None).decoder] == [64, 32]
    assert vitseg(**PRIMUS).rope.rotated_pairs == 6  # head_dim 12, 3 axes
    # encoder names as in MAEViT; decoder and head outside the encoder prefixes
    names = {n for n, _ in net.named_parameters()}
    assert {"patch_embedding.patch_embeddings.weight", POS, "blocks.1.attn.qkv.weight", "norm.weight"} <= names
    assert {"decoder.0.0.weight", "decoder.2.1.weight", "head.weight", "head.bias"} <= names


def test_vitseg_patch_one_has_no_upsampling():
    net = vitseg(spatial_dims=2, img_size=8, patch_size=1, decoder_channels=None)
    assert net.strides == [] and len(net.decoder) == 0
    assert net(torch.randn(1, 1, 8, 8)).shape == (1, 3, 8, 8)


def test_vitseg_default_decoder_output():
    net = vitseg(decoder_channels=None, num_layers=1)
    assert net(torch.randn(1, 1, 16, 16, 32)).shape == (1, 3, 16, 16, 32)


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        (dict(), (1, 1, 32, 32), r"ViTSeg\(3D\) expects input \(B, C, H, W, D\), got \(1, 1, 32, 32\)"),
        (dict(spatial_dims=2), (1, 1, 8, 8, 8), r"ViTSeg\(2D\) expects input \(B, C, H, W\), got \(1, 1, 8, 8, 8\)"),
        (dict(), (2, 3, 32, 32, 32), r"expects 1 input channel\(s\), got 3 \(shape \(2, 3, 32, 32, 32\)\)"),
        (dict(in_channels=2), (1, 1, 8, 8, 8), r"expects 2 input channel\(s\), got 1 \(shape \(1, 1, 8, 8, 8\)\)"),
        (dict(), (1, 1, 32, 32, 20), r"input: spatial axis 2 has size 20, which is not divisible by the patch size 8"),
        (dict(patch_size=(8, 8, 4)), (1, 1, 12, 8, 4), r"spatial axis 0 has size 12.*\(12, 8, 4\)"),
    ],
)
def test_vitseg_bad_input(kwargs, shape, match):
    net = vitseg(**kwargs)
    with pytest.raises(ValueError, match=match):
        net(torch.randn(*shape))


def test_vitseg_non_tensor_input():
    with pytest.raises(ValueError, match=r"ViTSeg\(3D\) expects input \(B, C, H, W, D\), got ndarray"):
        vitseg()(np.zeros((1, 1, 32, 32, 32), dtype=np.float32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spatial_dims=1), "spatial_dims must be 2 or 3, got 1"),
        (dict(in_channels=0), "in_channels must be >= 1, got 0"),
        (dict(out_channels=0), "out_channels must be >= 1, got 0"),
        (dict(num_layers=0), "num_layers must be >= 1, got 0"),
        (dict(hidden_size=20, num_heads=3), "hidden_size=20 must be divisible by num_heads=3"),
        (dict(dropout_rate=1.5), r"dropout_rate must be in \[0, 1\], got 1.5"),
        (dict(patch_size=6, img_size=36), r"power-of-2 patch sides .*got \(6, 6, 6\)"),
        (
            dict(decoder_channels=(16, 8)),
            r"decoder_channels needs 3 positive entries .*patch size \(8, 8, 8\).*got \[16, 8\]",
        ),
        (dict(decoder_channels=(16, 8, 4, 2)), r"decoder_channels needs 3 positive entries .*got \[16, 8, 4, 2\]"),
        (dict(decoder_channels=(16, 0, 4)), r"decoder_channels needs 3 positive entries .*got \[16, 0, 4\]"),
        (dict(patch_size=(8, 8, 4), decoder_channels=(8, 4)), r"needs 3 positive entries .*patch size \(8, 8, 4\)"),
        (dict(img_size=36), r"img_size: spatial axis 0 has size 36, which is not divisible by the patch size 8"),
        (dict(mlp_type="relu"), "'relu' is not a valid value"),
        (dict(layer_scale_init=-1.0), "layer_scale_init must be None or a positive number, got -1.0"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
        (dict(pos_embed_type="rope", rope_theta=1.0), "rope_theta must be > 1, got 1.0"),
        (
            dict(pos_embed_type="rope", hidden_size=16, num_heads=4),
            r"head_dim >= 2 \* spatial_dims = 6, got head_dim=4",
        ),
        (dict(pos_embed_type="sin"), "'sin' is not a valid value"),
    ],
)
def test_vitseg_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vitseg(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(pos_embed_type="learnable", **{k: v for k, v in PRIMUS.items() if k != "pos_embed_type"}),
        dict(**PRIMUS, drop_path_rate=0.2),
        dict(spatial_dims=2, img_size=16, pos_embed_type="rope"),
    ],  # fmt: skip
)
def test_vitseg_gradient_reaches_every_trainable_parameter(kwargs):
    torch.manual_seed(1)
    net = vitseg(**kwargs)
    x = torch.randn(2, 1, *net.img_size)
    target = torch.randn(2, 3, *net.img_size)
    (net(x) - target).square().mean().backward()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen <= {POS}  # only a fixed table (sin-cos / rope zeros)
    for name, param in trainable.items():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        # a decoder conv bias is removed again by the instance norm after it: its gradient vanishes
        if not (name.startswith("decoder.") and name.endswith(".0.bias")):
            assert param.grad.abs().sum() > 0, name


def test_vitseg_activation_checkpointing_same_output_and_gradients():
    torch.manual_seed(2)
    plain = vitseg(**PRIMUS)
    checkpointed = vitseg(**PRIMUS, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    out_plain, out_ckpt = plain(x), checkpointed(x)
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    out_plain.sum().backward()
    out_ckpt.sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("kwargs", [dict(drop_path_rate=0.5), dict(dropout_rate=0.3, pos_embed_type="rope")])
def test_vitseg_stochastic_in_train_deterministic_in_eval(kwargs):
    torch.manual_seed(3)
    net = vitseg(decoder_channels=(4, 4, 4), **kwargs)
    x = torch.randn(4, 1, 16, 16, 16)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.allclose(net(x), net(x))


def test_vitseg_rope_translation_of_constant_content():
    """With RoPE and no additive table, an image made of one repeated patch gives the same features
    at every token, whatever the grid size (no absolute position anywhere)."""
    torch.manual_seed(4)
    net = randomize_(vitseg(pos_embed_type="rope", num_layers=1)).eval()
    patch = torch.randn(1, 1, 8, 8, 8)
    for reps in ((4, 4, 4), (2, 3, 5)):
        features, _ = net.forward_features(patch.repeat(1, 1, *reps))
        assert torch.allclose(features, features[:, :1].expand_as(features), atol=1e-5)


# -------------------------------------------------------------------------------- MAE -> ViTSeg
@pytest.mark.parametrize(
    "options",
    [dict(), dict(pos_embed_type="learnable"), PRIMUS, dict(**PRIMUS, drop_path_rate=0.1), dict(mlp_type="swiglu")],
    ids=["default", "learnable", "primus", "primus_droppath", "swiglu"],
)
@pytest.mark.parametrize("dims", [3, 2])
def test_load_mae_encoder_into_vitseg_same_features(options, dims):
    torch.manual_seed(5)
    size = 32 if dims == 3 else (32, 16)
    source = randomize_(mae(img_size=size, spatial_dims=dims, cls_token=False, **options)).eval()
    target = vitseg(img_size=size, spatial_dims=dims, **options).eval()
    decoder_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith(("decoder.", "head."))}
    report = load_mae_encoder(target, source, verbose=False)
    assert report.missing == [] and report.skipped == []
    assert set(report.loaded) == {
        k for k in target.state_dict() if k.startswith(("patch_embedding.", "blocks.", "norm."))
    }
    mae_decoder = {k for k in source.state_dict() if k.startswith(("decoder_", "mask_tokens"))}
    assert mae_decoder and mae_decoder <= set(report.ignored)
    assert "cls_token" not in report.ignored
    if "mlp_type" not in options and "pos_embed_type" not in options:  # MONAI blocks in the MAE
        assert "blocks.0.norm_cross_attn.weight" in report.ignored
    # the ViTSeg decoder and head are not touched
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in decoder_before.items())
    x = torch.rand(2, 1, *source.img_size)
    with torch.no_grad():
        expected = source.forward_encoder(x)
        features, _ = target.forward_features(x)
    assert expected.shape == features.shape == (2, math.prod(source.grid_size), ENCODER["hidden_size"])
    if "mlp_type" in options or options.get("pos_embed_type") == "rope":
        assert torch.equal(features, expected)  # same EncoderBlock code on both sides
    else:
        assert torch.allclose(features, expected, atol=1e-6)


def test_load_mae_encoder_into_vitseg_from_file_and_nested(tmp_path):
    torch.manual_seed(6)
    source = randomize_(mae(cls_token=False, **PRIMUS)).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"network": {f"module.{k}": v for k, v in source.state_dict().items()}, "optimizer": {}}, path)
    target = vitseg(**PRIMUS).eval()
    report = load_mae_encoder(target, path, verbose=False)
    assert report.missing == []
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(target.forward_features(x)[0], source.forward_encoder(x))


def test_load_mae_with_class_token_into_vitseg():
    source = mae()  # class token, MONAI blocks
    target = vitseg()
    report = load_mae_encoder(target, source, verbose=False)
    assert "cls_token" in report.ignored
    assert report.missing == []
    assert not hasattr(target, "cls_token") or target.cls_token is None


def test_load_rope_mae_into_vitseg_of_other_img_size():
    """RoPE carries no table: a ViTSeg built for 48^3 computes what the 32^3 MAE computes on 32^3 input."""
    torch.manual_seed(7)
    source = randomize_(mae(cls_token=False, **PRIMUS)).eval()
    target = vitseg(img_size=48, **PRIMUS).eval()
    report = load_mae_encoder(target, source, verbose=False)
    assert report.interpolated == [POS] and report.missing == []
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(target.forward_features(x)[0], source.forward_encoder(x))


@pytest.mark.parametrize(
    "source_kw, target_kw, match",
    [
        (dict(), dict(hidden_size=16), "hidden width differs: checkpoint has hidden_size=24, target has 16"),
        (dict(hidden_size=48, num_heads=4), dict(), "checkpoint has hidden_size=48, target has 24"),
        (dict(num_layers=3), dict(), "depth differs: checkpoint has 3 blocks, target has 2"),
        (dict(patch_size=16), dict(), r"patch size differs: checkpoint has \(16, 16, 16\), target has \(8, 8, 8\)"),
        (
            dict(mlp_type="swiglu"),
            dict(),
            r"blocks.0.mlp.linear1.weight: checkpoint shape \(64, 24\) != target shape \(32, 24\)",
        ),
        (
            dict(layer_scale_init=0.1),
            dict(),
            r"checkpoint encoder keys with no place in the target: blocks.0.ls1.gamma",
        ),
        (dict(), dict(layer_scale_init=0.1), r"target keys missing from the checkpoint: blocks.0.ls1.gamma"),
    ],  # fmt: skip
)
def test_load_mae_encoder_into_vitseg_misfit(source_kw, target_kw, match):
    source = mae(cls_token=False, **source_kw)
    target = vitseg(**target_kw)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_mae_encoder(target, source, verbose=False)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())  # untouched


def test_vitseg_weights_load_into_monai_vit():
    """The other way: a ViTSeg encoder (no cross-attention norm) into MONAI's ViT (which has one)."""
    torch.manual_seed(8)
    source = randomize_(vitseg()).eval()
    target = ViT(1, 32, 8, pos_embed_type="learnable", **ENCODER).eval()
    report = load_mae_encoder(target, source, verbose=False)
    assert report.missing == []
    assert not any("norm_cross_attn" in k for k in report.loaded)
    assert {"decoder.0.0.weight", "head.weight"} <= set(report.ignored)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(target(x)[0], source.forward_features(x)[0], atol=1e-5)


# ------------------------------------------------------------------------------ residual stream
@pytest.mark.parametrize("options", [dict(), PRIMUS, dict(layer_scale_init=0.5, pos_embed_type="learnable")])
def test_residual_stream_norm_of_vitseg(options):
    torch.manual_seed(9)
    net = randomize_(vitseg(**options)).train()
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        expected = block_output_norm(net.eval(), x)
    net.train()
    assert residual_stream_norm(net, x) == pytest.approx(expected, rel=1e-5)
    assert net.training  # mode restored
    # without images: the seeded reference batch of uniform noise at img_size
    reference = torch.rand((2, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert residual_stream_norm(net) == pytest.approx(block_output_norm(net.eval(), reference), rel=1e-5)


@pytest.mark.parametrize(
    "options", [dict(), PRIMUS, dict(mlp_type="swiglu", layer_scale_init=0.3, pos_embed_type="learnable")]
)
@pytest.mark.parametrize("scale", [0.2, 7.0])
def test_match_residual_stream_of_vitseg(options, scale):
    torch.manual_seed(10)
    net = randomize_(vitseg(**options)).double().eval()
    x = torch.rand(2, 1, 32, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        features_before, _ = net.forward_features(x)
        logits_before = net(x)
        hidden_before = block_output_norm(net, x)
    current = residual_stream_norm(net, x)
    target = scale * current
    factor = match_residual_stream(net, target, x)
    assert factor == pytest.approx(scale, rel=1e-9)
    assert residual_stream_norm(net, x) == pytest.approx(target, rel=1e-4)
    with torch.no_grad():
        features_after, _ = net.forward_features(x)
        assert torch.allclose(features_after, features_before, atol=1e-4)
        assert torch.allclose(net(x), logits_before, atol=1e-4)
        assert block_output_norm(net, x) == pytest.approx(scale * hidden_before, rel=1e-4)


def test_rescale_residual_stream_of_vitseg_scales_every_block_output():
    torch.manual_seed(11)
    net = randomize_(vitseg(**PRIMUS)).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone())) for b in net.blocks]
    with torch.no_grad():
        features = net.forward_features(x)[0]
        rescale_residual_stream(net, 2.5)
        scaled_features = net.forward_features(x)[0]
    for hook in hooks:
        hook.remove()
    before, after = outputs[: len(net.blocks)], outputs[len(net.blocks) :]
    assert all(torch.allclose(b * 2.5, a, rtol=1e-4, atol=1e-5) for b, a in zip(before, after))
    assert torch.allclose(scaled_features, features, atol=1e-4)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), True])
def test_match_residual_stream_invalid_target(bad):
    with pytest.raises(ValueError, match="target_norm must be a positive finite number"):
        match_residual_stream(vitseg(), bad)


# ----------------------------------------------------------------- fine-tuning: groups, freezing
def test_encoder_parameters_of_vitseg():
    net = vitseg(**PRIMUS)
    params = encoder_parameters(net)
    names = {id(p): n for n, p in net.named_parameters()}
    got = [names[id(p)] for p in params]
    assert set(got) == encoder_names(net)
    assert POS in got  # trainable or not
    assert not any(n.startswith(("decoder.", "head.")) for n in got)
    assert got == [n for n, _ in net.named_parameters() if n in set(got)]  # registration order


@pytest.mark.parametrize("scale", [0.3, 1.0, 0.05])
def test_layerwise_lr_groups_encoder_lr_scale(scale):
    net = vitseg(pos_embed_type="learnable", layer_scale_init=0.1)
    lr = 1e-3
    groups = layerwise_lr_groups(net, lr, layer_decay=1.0, encoder_lr_scale=scale)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len(lr_of) == sum(1 for p in net.parameters() if p.requires_grad)  # each once
    encoder = encoder_names(net)
    for name, param in net.named_parameters():
        expected = lr * scale if name in encoder else lr
        assert lr_of[id(param)] == pytest.approx(expected, rel=1e-12), name
    if scale == 1.0:  # one group per (layer, decay): encoder norm and decoder share the top groups
        assert len(groups) == len({(g["layer_id"], g["weight_decay"]) for g in groups})
    assert groups[0]["lr"] == pytest.approx(lr)  # the top (decoder) group first


def test_layerwise_lr_groups_decay_times_encoder_scale():
    net = vitseg(**PRIMUS)  # 2 blocks
    lr, decay, scale = 1e-3, 0.5, 0.3
    groups = layerwise_lr_groups(net, lr, layer_decay=decay, encoder_lr_scale=scale)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    expected = {
        "patch_embedding.patch_embeddings.weight": lr * decay**3 * scale,
        "blocks.0.attn.qkv.weight": lr * decay**2 * scale,
        "blocks.0.ls1.gamma": lr * decay**2 * scale,
        "blocks.1.mlp.linear1.weight": lr * decay * scale,
        "norm.weight": lr * scale,
        "decoder.0.0.weight": lr,
        "decoder.2.1.weight": lr,
        "head.weight": lr,
    }
    params = dict(net.named_parameters())
    for name, value in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(value, rel=1e-12), name
    assert id(params[POS]) not in lr_of  # fixed zero table: left out
    weight_decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert weight_decay[id(params["head.weight"])] == 0.05 and weight_decay[id(params["head.bias"])] == 0.0
    assert weight_decay[id(params["blocks.0.ls1.gamma"])] == 0.0


@pytest.mark.parametrize("bad", [0.0, -0.3, 1.5])
def test_layerwise_lr_groups_invalid_encoder_lr_scale(bad):
    with pytest.raises(ValueError, match=r"encoder_lr_scale must be in \(0, 1\], got " + re.escape(repr(bad))):
        layerwise_lr_groups(vitseg(), 1e-3, encoder_lr_scale=bad)


def test_freeze_encoder_on_vitseg():
    net = vitseg(pos_embed_type="learnable")
    encoder = encoder_names(net)
    freezer = FreezeEncoder(net, epochs=1)
    freezer.freeze()
    for name, param in net.named_parameters():
        assert param.requires_grad == (name not in encoder), name
    # a step while frozen: only the decoder and head get gradients
    net(torch.randn(1, 1, 32, 32, 32)).mean().backward()
    for name, param in net.named_parameters():
        assert (param.grad is not None) == (name not in encoder), name
    freezer.unfreeze()
    assert all(p.requires_grad for p in net.parameters())


def test_freeze_encoder_on_vitseg_with_engine():
    net = vitseg(**PRIMUS)
    encoder = encoder_names(net)
    seen: dict[int, dict[str, bool]] = {}

    def step(engine, _batch):
        seen[engine.state.epoch] = {n: p.requires_grad for n, p in net.named_parameters()}

    engine = Engine(step)
    FreezeEncoder(net, epochs=2).attach(engine)
    engine.run([0], max_epochs=3)
    for epoch in (1, 2):
        assert {n for n, flag in seen[epoch].items() if flag} == {n for n, _ in net.named_parameters()} - encoder
    assert {n for n, flag in seen[3].items() if flag} == {n for n, _ in net.named_parameters()} - {POS}
    assert not net.patch_embedding.position_embeddings.requires_grad  # fixed table stays fixed


@pytest.mark.parametrize("as_file", [False, True])
def test_rope_and_table_encoders_do_not_transfer_into_each_other(tmp_path, as_file):
    """A RoPE encoder's zero table copied into a table-based target would leave it without positions."""
    from monai_mae import MAEViT
    from monai_mae.model_file import save_model
    from monai_mae.networks.transfer import load_mae_encoder

    small = dict(hidden_size=24, mlp_dim=32, num_layers=2, num_heads=2, qkv_bias=True)
    rope = MAEViT(1, 32, 8, **small, decoder_hidden_size=16, decoder_num_heads=2, decoder_num_layers=1, cls_token=False,
                  pos_embed_type="rope")  # fmt: skip
    source = save_model(rope, tmp_path / "rope.pt") if as_file else rope
    target = ViTSeg(1, 3, 32, 8, **small)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"position embedding differs: checkpoint has pos_embed_type='rope', target has 'sincos'"
    ):
        load_mae_encoder(target, source, verbose=False)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert load_mae_encoder(ViTSeg(1, 3, 32, 8, **small, pos_embed_type="rope"), source, verbose=False).missing == []
