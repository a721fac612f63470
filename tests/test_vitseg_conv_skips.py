"""``ViTSeg(conv_skips=True)``: the UNETR-like hybrid with a convolutional stem joining the last two decoder stages."""

from __future__ import annotations

import pytest
import torch

from monai_mae.engines.finetune import FreezeEncoder, encoder_parameters, layerwise_lr_groups
from monai_mae.model_file import build_network, network_spec, read_model, save_model
from monai_mae.networks.checkpoint_adapters import is_encoder_key
from monai_mae.networks.mae import MAEViT
from monai_mae.networks.transfer import load_mae_encoder
from monai_mae.networks.vitseg import ViTSeg
from monai_mae.utils import find_vit

ENCODER = dict(hidden_size=24, mlp_dim=32, num_layers=2, num_heads=2, qkv_bias=True)
SKIP_PREFIXES = ("skip_stem.", "skip_fuse.")


def hybrid(**kw) -> ViTSeg:
    args = dict(in_channels=1, out_channels=3, img_size=32, patch_size=8, decoder_channels=(16, 8, 4), **ENCODER)
    return ViTSeg(**{**args, "conv_skips": True, **kw})


def skip_names(net: torch.nn.Module) -> list[str]:
    return [n for n, _ in net.named_parameters() if n.startswith(SKIP_PREFIXES)]


# ------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "kwargs, shape, skips",
    [
        (dict(), (2, 1, 32, 32, 32), [(2, 4, 32, 32, 32), (2, 8, 16, 16, 16)]),
        (dict(), (1, 1, 40, 24, 16), [(1, 4, 40, 24, 16), (1, 8, 20, 12, 8)]),  # not img_size
        (
            dict(patch_size=16, img_size=32, decoder_channels=(16, 8, 8, 4)),
            (1, 1, 32, 48, 16),
            [(1, 4, 32, 48, 16), (1, 8, 16, 24, 8)],
        ),
        (dict(patch_size=(8, 8, 4)), (1, 1, 16, 32, 8), [(1, 4, 16, 32, 8), (1, 8, 8, 16, 8)]),  # last stride (2, 2, 1)
        (dict(spatial_dims=2, img_size=(32, 16)), (2, 1, 32, 16), [(2, 4, 32, 16), (2, 8, 16, 8)]),
        (
            dict(
                spatial_dims=2,
                img_size=64,
                patch_size=16,
                decoder_channels=(16, 8, 8, 4),
                in_channels=2,
                out_channels=5,
            ),
            (1, 2, 64, 48),
            [(1, 4, 64, 48), (1, 8, 32, 24)],
        ),
        (dict(patch_size=2, decoder_channels=(4,)), (1, 1, 8, 6, 4), [(1, 4, 8, 6, 4)]),  # one stage: full res only
    ],
)
def test_output_and_skip_shapes(kwargs, shape, skips):
    net = hybrid(**kwargs).eval()
    x = torch.randn(*shape)
    out = net(x)
    assert out.shape == (shape[0], net.out_channels, *shape[2:])
    assert torch.isfinite(out).all()
    assert [tuple(f.shape) for f in net.skip_features(x)] == skips
    assert len(net.skip_stem) == len(net.skip_fuse) == len(skips)


def test_the_skips_change_the_output_of_a_network_with_the_same_encoder_and_decoder():
    torch.manual_seed(0)
    net = hybrid().eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = net(x)
        net.skip_stem[0].conv.weight.mul_(2.0)  # the full-resolution stem feeds the last stage
        assert not torch.allclose(before, net(x))


def test_conv_skips_needs_an_upsampling_stage():
    with pytest.raises(ValueError, match=r"conv_skips needs at least one x2 upsampling stage.*\(1, 1, 1\)"):
        hybrid(patch_size=1, decoder_channels=())


# ----------------------------------------------------------------------------- default off: unchanged
def test_default_off_keeps_the_state_dict_keys_and_the_seeded_weights():
    plain_args = dict(in_channels=1, out_channels=3, img_size=32, patch_size=8, **ENCODER)
    torch.manual_seed(3)
    default = ViTSeg(**plain_args)
    torch.manual_seed(3)
    off = ViTSeg(**plain_args, conv_skips=False)
    mae = MAEViT(1, 32, 8, **ENCODER, cls_token=False)
    mae_encoder = {k for k in mae.state_dict() if is_encoder_key(k) and ".norm_cross_attn." not in k}
    decoder = {f"decoder.{i}.{j}.{w}" for i in range(3) for j in (0, 1) for w in ("weight", "bias")}
    expected = mae_encoder | decoder | {"head.weight", "head.bias"}
    assert set(default.state_dict()) == set(off.state_dict()) == expected
    assert all(torch.equal(v, off.state_dict()[k]) for k, v in default.state_dict().items())  # same draws
    off.load_state_dict(default.state_dict())  # strict
    assert default.init_args["conv_skips"] is False and not hasattr(default, "skip_stem")


def test_a_hybrid_adds_only_skip_parameters_to_the_plain_network():
    torch.manual_seed(4)
    plain = hybrid(conv_skips=False)
    torch.manual_seed(4)
    net = hybrid()
    added = set(net.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(net.state_dict())
    assert added and all(k.startswith(SKIP_PREFIXES) for k in added)
    # the stem is built after the decoder and head: the encoder, decoder and head draw the same weights
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in plain.state_dict().items())


# -------------------------------------------------------------------------------------- MAE -> hybrid
@pytest.mark.parametrize("dims", [3, 2])
def test_mae_encoder_loads_into_the_hybrid(dims):
    torch.manual_seed(5)
    size = 32 if dims == 3 else (32, 16)
    source = MAEViT(
        1,
        size,
        8,
        **ENCODER,
        spatial_dims=dims,
        cls_token=False,
        decoder_hidden_size=16,
        decoder_mlp_dim=16,
        decoder_num_layers=1,
        decoder_num_heads=2,
    )
    with torch.no_grad():
        for param in source.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    target = hybrid(img_size=size, spatial_dims=dims).eval()
    skips_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith(SKIP_PREFIXES)}
    report = load_mae_encoder(target, source, verbose=False)
    assert report.missing == [] and report.skipped == []
    encoder_keys = {k for k in target.state_dict() if is_encoder_key(k)}
    assert set(report.loaded) == encoder_keys
    source_state = source.state_dict()
    assert all(torch.equal(target.state_dict()[k], source_state[k]) for k in encoder_keys)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in skips_before.items())  # stem untouched
    assert find_vit(target) == (target, "")


# ---------------------------------------------------------------------------- decoder everywhere
def test_the_stem_is_decoder_in_encoder_parameters_and_lr_groups():
    net = hybrid()
    names = {id(p): n for n, p in net.named_parameters()}
    encoder = {names[id(p)] for p in encoder_parameters(net)}
    assert encoder == {n for n in names.values() if is_encoder_key(n)}
    stem = skip_names(net)
    assert stem and not set(stem) & encoder
    lr, decay, scale = 1e-3, 0.5, 0.3
    groups = layerwise_lr_groups(net, lr, layer_decay=decay, encoder_lr_scale=scale)
    group_of = {id(p): g for g in groups for p in g["params"]}
    params = dict(net.named_parameters())
    for name in stem:
        assert group_of[id(params[name])]["lr"] == pytest.approx(lr, rel=1e-12), name
        assert group_of[id(params[name])]["layer_id"] == len(net.blocks) + 1, name
    assert group_of[id(params["blocks.0.attn.qkv.weight"])]["lr"] == pytest.approx(lr * decay**2 * scale)
    assert group_of[id(params["skip_stem.0.conv.weight"])]["weight_decay"] == 0.05
    assert group_of[id(params["skip_fuse.1.conv.bias"])]["weight_decay"] == 0.0


def test_freeze_encoder_leaves_the_stem_trainable_and_the_stem_gets_gradients():
    torch.manual_seed(6)
    net = hybrid()
    trainable = [p.requires_grad for p in net.parameters()]  # all but the fixed sin-cos table
    freezer = FreezeEncoder(net, epochs=1)
    freezer.freeze()
    encoder = {n for n, _ in net.named_parameters() if is_encoder_key(n)}
    assert all(p.requires_grad == (n not in encoder) for n, p in net.named_parameters())
    x, target = torch.randn(2, 1, 32, 32, 32), torch.randn(2, 3, 32, 32, 32)
    (net(x) - target).square().mean().backward()
    params = dict(net.named_parameters())
    for name in skip_names(net):
        assert params[name].grad is not None and torch.isfinite(params[name].grad).all(), name
        if name.endswith("weight"):  # conv biases before an instance norm have a vanishing gradient
            assert params[name].grad.abs().sum() > 0, name
    assert all(params[n].grad is None for n in encoder)
    freezer.unfreeze()
    assert [p.requires_grad for p in net.parameters()] == trainable


# ----------------------------------------------------------------------------------------- model file
@pytest.mark.parametrize(
    "kwargs", [dict(), dict(spatial_dims=2, img_size=64, patch_size=16, decoder_channels=(16, 8, 8, 4))]
)
def test_model_file_round_trip_rebuilds_the_hybrid(tmp_path, kwargs):
    torch.manual_seed(7)
    net = hybrid(**kwargs).eval()
    path = save_model(net, tmp_path / "model.pt")
    assert read_model(path).network["conv_skips"] is True
    assert network_spec(net)["_target_"] == "monai_mae.networks.vitseg.ViTSeg"
    rebuilt = build_network(path).eval()
    assert rebuilt.conv_skips and skip_names(rebuilt) == skip_names(net)
    x = torch.randn(1, 1, *net.img_size)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
    with pytest.raises(ValueError, match=r"conv_skips=False \(given\) vs conv_skips=True"):
        build_network(path, conv_skips=False)


def test_a_model_file_without_conv_skips_rebuilds_a_plain_vitseg(tmp_path):
    """A file written before the option existed records no ``conv_skips``: it rebuilds the plain network."""
    torch.manual_seed(8)
    net = hybrid(conv_skips=False).eval()
    path = save_model(net, tmp_path / "model.pt")
    content = torch.load(path, weights_only=True)
    del content["monai_mae"]["network"]["conv_skips"]
    torch.save(content, path)
    rebuilt = build_network(path).eval()
    assert not rebuilt.conv_skips and skip_names(rebuilt) == []
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))


def test_the_hybrid_traces_as_the_exported_vitseg_does():
    """``ckpt_export`` traces ViTSeg (``use_trace``): the traced hybrid gives the same logits."""
    torch.manual_seed(9)
    net = hybrid().eval()
    x = torch.randn(1, 1, 32, 32, 32)
    traced = torch.jit.trace(net, x)
    other = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(traced(other), net(other), atol=1e-5)
