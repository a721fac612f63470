from __future__ import annotations

import logging

import pytest
import torch
from monai.networks import eval_mode
from monai.networks.nets import UNETR, MaskedAutoEncoderViT, ViT

from monai_mae.networks.checkpoint_io import extract_encoder_state_dict
from monai_mae.networks.mae import MAEViT
from monai_mae.networks.pos_embed import interpolate_pos_embed
from monai_mae.networks.residual import match_residual_stream, rescale_residual_stream, residual_stream_norm
from monai_mae.networks.transfer import TransferReport, load_mae_encoder

WIDTH = dict(hidden_size=24, mlp_dim=48, num_heads=4)
DECODER = dict(decoder_hidden_size=12, decoder_mlp_dim=24, decoder_num_layers=1, decoder_num_heads=4)
POS = "patch_embedding.position_embeddings"


def mae(**kw) -> MAEViT:
    args = dict(in_channels=1, img_size=32, patch_size=16, num_layers=12, **WIDTH, **DECODER)
    return MAEViT(**{**args, **kw})


def vit(**kw) -> ViT:
    args = dict(in_channels=1, img_size=32, patch_size=16, num_layers=2, **WIDTH)
    return ViT(**{**args, **kw})


def unetr(img_size: int = 32) -> UNETR:
    return UNETR(in_channels=1, out_channels=2, img_size=img_size, feature_size=4, **WIDTH)


def snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_unchanged(net: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def mae12() -> MAEViT:
    torch.manual_seed(1)
    return mae()


def encoder_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.startswith(("patch_embedding.", "blocks.", "norm."))]


def decoder_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.startswith(("decoder_", "mask_tokens"))]


# ------------------------------------------------------------------------------ checkpoint forms
@pytest.mark.parametrize("form", ["state_dict", "file", "nested_ddp", "nested_compiled", "module"])
def test_every_encoder_tensor_arrives_in_unetr(mae12, form, tmp_path):
    sd = mae12.state_dict()
    if form == "state_dict":
        checkpoint = sd
    elif form == "file":
        checkpoint = tmp_path / "mae.pt"
        torch.save(sd, checkpoint)
    elif form == "nested_ddp":  # Ignite / bundle checkpoint, saved and read back with weights_only=True
        opt = torch.optim.SGD(mae12.parameters(), lr=0.1, momentum=0.9)
        checkpoint = tmp_path / "ckpt.pth"
        torch.save({"network": {f"module.{k}": v for k, v in sd.items()}, "optimizer": opt.state_dict(), "epoch": 3},
                   checkpoint)  # fmt: skip
    elif form == "nested_compiled":
        checkpoint = {"state_dict": {"model": {f"_orig_mod.module.{k}": v for k, v in sd.items()}}, "step": 7}
    else:
        checkpoint = mae12
    net = unetr()
    report = load_mae_encoder(net, checkpoint, verbose=False)
    target = net.vit.state_dict()
    for key in encoder_keys(sd):
        assert torch.equal(target[key], sd[key]), key
    assert sorted(report.loaded) == sorted(f"vit.{k}" for k in encoder_keys(sd))
    assert set(decoder_keys(sd)) | {"cls_token"} == set(report.ignored)
    assert report.missing == [] and report.skipped == [] and report.interpolated == []


def test_monai_masked_autoencoder_vit_layout():
    monai_mae = MaskedAutoEncoderViT(in_channels=1, img_size=32, patch_size=16, num_layers=12, **WIDTH, **DECODER)
    sd = monai_mae.state_dict()
    assert "blocks.12.weight" in sd and "norm.weight" not in sd  # MONAI keeps the final norm in the block list
    net = unetr()
    report = load_mae_encoder(net, sd, verbose=False)
    target = net.vit.state_dict()
    assert torch.equal(target["norm.weight"], sd["blocks.12.weight"])
    assert torch.equal(target["norm.bias"], sd["blocks.12.bias"])
    for key in encoder_keys(sd):
        if not key.startswith("blocks.12."):
            assert torch.equal(target[key], sd[key]), key
    assert report.missing == [] and set(decoder_keys(sd)) <= set(report.ignored)


def test_extract_encoder_state_dict_same_keys_for_both_layouts(mae12):
    ours = extract_encoder_state_dict({"net": mae12.state_dict()})
    theirs = extract_encoder_state_dict(
        MaskedAutoEncoderViT(in_channels=1, img_size=32, patch_size=16, num_layers=12, **WIDTH, **DECODER).state_dict()
    )
    assert sorted(ours) == sorted(theirs)
    assert "cls_token" in ours and "norm.weight" in ours and not decoder_keys(ours)
    assert all(ours[k] is mae12.state_dict()[k] or torch.equal(ours[k], mae12.state_dict()[k]) for k in ours)


# ------------------------------------------------------------------------------ position tables
def test_larger_unetr_interpolates_position_table(mae12):
    net = unetr(64)
    report = load_mae_encoder(net, mae12.state_dict(), verbose=False)
    target, sd = net.vit.state_dict(), mae12.state_dict()
    assert target[POS].shape == (1, 64, 24)
    assert torch.equal(target[POS], interpolate_pos_embed(sd[POS], (2, 2, 2), (4, 4, 4)))
    assert report.interpolated == [f"vit.{POS}"] and f"vit.{POS}" in report.loaded
    assert "interpolated" in str(report)
    for key in encoder_keys(sd):
        if key != POS:
            assert torch.equal(target[key], sd[key]), key
    with eval_mode(net), torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64, 64)).shape == (1, 2, 64, 64, 64)


def test_grid_change_without_interpolation_is_an_error(mae12):
    net = unetr(64)
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"patch grid differs: checkpoint has 8 positions.*interpolate=True"):
        load_mae_encoder(net, mae12.state_dict(), interpolate=False, verbose=False)
    assert_unchanged(net, before)


def test_anisotropic_grid_recognised_from_sincos_table():
    source = mae(img_size=(32, 64, 32))  # grid (2, 4, 2), sin-cos
    net = UNETR(in_channels=1, out_channels=2, img_size=(64, 64, 32), feature_size=4, **WIDTH)  # grid (4, 4, 2)
    report = load_mae_encoder(net, source.state_dict(), verbose=False)
    expected = interpolate_pos_embed(source.patch_embedding.position_embeddings, (2, 4, 2), (4, 4, 2))
    assert torch.equal(net.vit.patch_embedding.position_embeddings, expected)
    assert report.interpolated == [f"vit.{POS}"]


def test_anisotropic_learnable_grid_needs_explicit_grids():
    sd = mae(num_layers=2, img_size=(32, 64, 32), pos_embed_type="learnable").state_dict()
    target = vit(img_size=(64, 64, 32))
    before = snapshot(target)
    with pytest.raises(ValueError, match="cannot infer both patch grids.*source_grid="):
        load_mae_encoder(target, sd, verbose=False)
    assert_unchanged(target, before)
    report = load_mae_encoder(target, sd, source_grid=(2, 4, 2), target_grid=(4, 4, 2), verbose=False)
    expected = interpolate_pos_embed(sd[POS], (2, 4, 2), (4, 4, 2))
    assert torch.equal(target.patch_embedding.position_embeddings, expected) and report.interpolated == [POS]


def test_sincos_source_into_learnable_target_stays_learnable():
    source = mae(num_layers=2, pos_embed_type="sincos")
    target = vit(pos_embed_type="learnable")
    report = load_mae_encoder(target, source.state_dict(), verbose=False)
    assert torch.equal(target.patch_embedding.position_embeddings, source.patch_embedding.position_embeddings)
    assert target.patch_embedding.position_embeddings.requires_grad
    assert report.converted == [POS]
    assert any("learnable" in note for note in report.notes)


def test_learned_source_into_fixed_sincos_target_keeps_it_fixed():
    source = mae(num_layers=2, pos_embed_type="learnable")
    target = vit(pos_embed_type="sincos")
    report = load_mae_encoder(target, source.state_dict(), verbose=False)
    assert torch.equal(target.patch_embedding.position_embeddings, source.patch_embedding.position_embeddings)
    assert not target.patch_embedding.position_embeddings.requires_grad
    assert report.converted == [POS] and any("fixed" in note for note in report.notes)


# ------------------------------------------------------------------------------ projection conversion
@pytest.mark.parametrize("spatial_dims, img_size, patch_size", [(3, (16, 16, 16), (8, 4, 8)), (2, (16, 32), (4, 8))])
def test_conv_perceptron_round_trip_computes_the_same_function(spatial_dims, img_size, patch_size):
    geometry = dict(in_channels=2, img_size=img_size, patch_size=patch_size, spatial_dims=spatial_dims)
    source = mae(**geometry, num_layers=2)
    conv, perceptron, back = vit(**geometry), vit(**geometry, proj_type="perceptron"), vit(**geometry)
    load_mae_encoder(conv, source.state_dict(), verbose=False)
    report = load_mae_encoder(perceptron, source.state_dict(), verbose=False)
    assert report.converted == ["patch_embedding.patch_embeddings.1.weight", POS]
    report = load_mae_encoder(back, perceptron.state_dict(), verbose=False)  # perceptron -> conv
    assert report.converted == ["patch_embedding.patch_embeddings.weight", POS]  # sin-cos values, learnable table
    assert torch.equal(back.patch_embedding.patch_embeddings.weight, source.patch_embedding.patch_embeddings.weight)

    x = torch.randn(2, 2, *img_size)
    with eval_mode(conv, perceptron, back), torch.no_grad():
        (ref, ref_hidden), (out, hidden), (out_back, _) = conv(x), perceptron(x), back(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[0], ref_hidden[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_back, ref, atol=1e-5, rtol=1e-5)


def test_classification_vit_gets_cls_token_and_keeps_its_head():
    source = mae(num_layers=2)
    target = vit(classification=True, num_classes=3)
    head = target.classification_head[0].weight.clone()
    report = load_mae_encoder(target, source.state_dict(), verbose=False)
    assert torch.equal(target.cls_token, source.cls_token) and "cls_token" in report.loaded
    assert torch.equal(target.classification_head[0].weight, head) and report.missing == []


# ------------------------------------------------------------------------------ errors
ERROR_CASES = [
    ("width", dict(hidden_size=48), {}, r"hidden width differs: checkpoint has hidden_size=48, target has 24"),
    ("depth", {}, dict(num_layers=3), r"depth differs: checkpoint has 2 blocks, target has 3"),
    ("patch", dict(patch_size=8), {}, r"patch size differs: checkpoint has \(8, 8, 8\), target has \(16, 16, 16\)"),
    ("channels", {}, dict(in_channels=2), r"in_channels differ: checkpoint has 1, target has 2"),
    ("perceptron", dict(proj_type="perceptron"), dict(in_channels=2), r"patch size or in_channels differ.*4096.*8192"),
    ("spatial_dims", dict(spatial_dims=2), {}, r"spatial dims differ: checkpoint patch size \(16, 16\) is 2D"),
    ("qkv_bias", {}, dict(qkv_bias=True), r"missing from the checkpoint: blocks\.0\.attn\.qkv\.bias"),
    ("mlp", {}, dict(mlp_dim=40), r"blocks\.0\.mlp\.linear1\.weight: checkpoint shape \(48, 24\) != target shape"),
]


@pytest.mark.parametrize("name, source_kw, target_kw, match", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_misfit_raises_and_changes_nothing(name, source_kw, target_kw, match):
    source_kw = {**dict(num_layers=2), **source_kw}
    if "hidden_size" in source_kw:
        source_kw["num_heads"] = 4
    source, target = mae(**source_kw), vit(**target_kw)
    before = snapshot(target)
    with pytest.raises(ValueError, match=match):
        load_mae_encoder(target, source.state_dict(), verbose=False)
    assert_unchanged(target, before)


@pytest.mark.parametrize("network", [torch.nn.Linear(2, 2), "unetr"], ids=["Linear", "str"])
def test_wrong_network_type(mae12, network):
    with pytest.raises(ValueError, match=f"got {type(network).__name__}"):
        load_mae_encoder(network, mae12.state_dict(), verbose=False)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "mae.pt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mae_encoder(vit(), path, verbose=False)


def test_unreadable_file_names_it(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken\.pt.*weights_only=True"):
        load_mae_encoder(vit(), path, verbose=False)


def test_checkpoint_without_encoder():
    with pytest.raises(ValueError, match=r"no encoder weights.*optimizer"):
        extract_encoder_state_dict({"optimizer": {"lr": 0.1}, "epoch": 2})


# ------------------------------------------------------------------------------ strict=False, report
def test_non_strict_skips_and_reports_a_misfit_tensor():
    source = mae(num_layers=2)
    sd = dict(source.state_dict())
    bad = "blocks.1.attn.out_proj.weight"
    sd[bad] = torch.randn(24, 20)
    target = vit()
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.out_proj\.weight: checkpoint shape \(24, 20\)"):
        load_mae_encoder(target, sd, verbose=False)
    assert_unchanged(target, before)

    report = load_mae_encoder(target, sd, strict=False, verbose=False)
    assert report.skipped == [bad] and any(bad in note for note in report.notes)
    assert torch.equal(target.state_dict()[bad], before[bad])
    assert len(report.loaded) == len(encoder_keys(sd)) - 1
    assert torch.equal(target.state_dict()["blocks.1.mlp.linear1.weight"], sd["blocks.1.mlp.linear1.weight"])


def test_non_strict_width_mismatch_still_raises():
    with pytest.raises(ValueError, match="hidden width differs: checkpoint has hidden_size=48, target has 24"):
        load_mae_encoder(vit(), mae(num_layers=2, hidden_size=48).state_dict(), strict=False, verbose=False)


def test_non_strict_depth_and_channels_load_what_fits():
    source = mae(num_layers=3)
    target = vit(num_layers=2, in_channels=2)
    before = snapshot(target)
    report = load_mae_encoder(target, source.state_dict(), strict=False, verbose=False)
    assert report.skipped == ["patch_embedding.patch_embeddings.weight"]
    proj = "patch_embedding.patch_embeddings.weight"
    assert torch.equal(target.state_dict()[proj], before[proj])
    assert torch.equal(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert "blocks.2.attn.qkv.weight" in report.ignored and report.missing == []
    assert any("depth differs" in note for note in report.notes)


def test_report_is_logged(mae12, caplog):
    with caplog.at_level(logging.INFO, logger="monai_mae.networks.transfer"):
        report = load_mae_encoder(unetr(), mae12.state_dict())
    assert isinstance(report, TransferReport)
    assert f"{len(report.loaded)} tensors loaded" in caplog.text and "ignored" in str(report)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="monai_mae.networks.transfer"):
        load_mae_encoder(unetr(), mae12.state_dict(), verbose=False)
    assert caplog.text == ""


# ------------------------------------------------------------------------------ residual stream
def _pretrained_unetr(mae12, img_size: int = 32) -> UNETR:
    torch.manual_seed(0)
    net = unetr(img_size)
    load_mae_encoder(net, mae12.state_dict(), verbose=False)
    with torch.no_grad():  # an MAE whose stream grew, as after pretraining on [0, 1] intensities
        rescale_residual_stream(net, 40.0)
    return net


@pytest.mark.parametrize("network", ["unetr", "vit_conv", "vit_perceptron", "vit_cls"])
def test_rescale_residual_stream_keeps_the_function_and_scales_hidden_states(network):
    torch.manual_seed(0)
    net = {
        "unetr": lambda: unetr(32),
        "vit_conv": lambda: vit(img_size=(32, 32, 16)),
        "vit_perceptron": lambda: vit(proj_type="perceptron", spatial_dims=2, img_size=32, patch_size=8),
        "vit_cls": lambda: vit(classification=True, num_classes=3, post_activation=None),
    }[network]()
    encoder = net.vit if network == "unetr" else net
    shape = (
        (2, 1, 32, 32, 16)
        if network == "vit_conv"
        else (2, 1, 32, 32)
        if network == "vit_perceptron"
        else (2, 1, 32, 32, 32)
    )
    net = net.double()
    if network == "vit_cls":
        torch.nn.init.normal_(net.cls_token)  # zeros at init: LayerNorm of a zero token is undefined with eps = 0
    for module in net.modules():  # exact algebra: LayerNorm(c * x) == LayerNorm(x) holds for eps = 0
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 0.0
    x = torch.rand(shape, dtype=torch.float64)
    with eval_mode(net):
        out0, hidden0 = encoder(x)
        full0 = net(x) if network == "unetr" else None
        assert rescale_residual_stream(net, 0.1) is net
        out1, hidden1 = encoder(x)
    torch.testing.assert_close(out1, out0, atol=1e-10, rtol=1e-10)  # final norm (or classification head) unchanged
    for h0, h1 in zip(hidden0, hidden1):
        torch.testing.assert_close(h1, 0.1 * h0, atol=1e-9, rtol=1e-9)
    if full0 is not None:  # UNETR as a whole computes something else: its skips see smaller features
        assert not torch.allclose(net(x), full0)


def test_residual_stream_norm_on_reference_and_given_images(mae12):
    net = _pretrained_unetr(mae12)
    before = torch.random.get_rng_state()
    reference = residual_stream_norm(net)
    assert torch.equal(torch.random.get_rng_state(), before)  # the reference batch has its own generator
    assert residual_stream_norm(net) == reference  # deterministic
    x = torch.rand(1, 1, 32, 32, 32)
    with eval_mode(net.vit):
        _, hidden = net.vit(x)
    expected = torch.stack([h.norm(dim=-1).mean() for h in hidden]).mean()
    assert residual_stream_norm(net, x) == pytest.approx(float(expected), rel=1e-5)
    assert net.vit.training  # the train/eval mode is restored


def test_match_residual_stream_reaches_the_target(mae12):
    torch.manual_seed(0)
    fresh = residual_stream_norm(unetr(32))
    net = _pretrained_unetr(mae12)
    loaded = residual_stream_norm(net)
    assert loaded > 10 * fresh
    factor = match_residual_stream(net, fresh)
    assert factor == pytest.approx(fresh / loaded, rel=1e-5)
    assert residual_stream_norm(net) == pytest.approx(fresh, rel=1e-4)


@pytest.mark.parametrize("factor", [0.0, -1.0, float("nan"), float("inf"), True, "2"])
def test_rescale_residual_stream_rejects_bad_factors(factor):
    net = unetr(32)
    before = snapshot(net)
    with pytest.raises(ValueError, match="factor must be a positive finite number"):
        rescale_residual_stream(net, factor)
    assert_unchanged(net, before)


def test_rescale_residual_stream_errors_name_the_problem():
    with pytest.raises(ValueError, match="expects a MONAI UNETR, a MONAI ViT"):
        rescale_residual_stream(torch.nn.Linear(2, 2), 2.0)
    net = vit()
    net.blocks[1].attn.out_proj = torch.nn.Identity()  # as built with include_fc=False
    before = snapshot(net)
    with pytest.raises(ValueError, match="blocks.1 .*cannot be rescaled exactly"):
        rescale_residual_stream(net, 2.0)
    assert_unchanged(net, before)  # checked before anything is written
    with pytest.raises(ValueError, match="target_norm must be a positive finite number"):
        match_residual_stream(vit(), 0.0)


def test_residual_stream_norm_follows_the_network_dtype():
    torch.manual_seed(0)
    net = vit().double()
    assert isinstance(residual_stream_norm(net), float)  # the reference batch is built in float64 too
    net2 = vit(proj_type="perceptron", spatial_dims=2, img_size=(32, 48), patch_size=16)
    with pytest.raises(
        ValueError, match=r"cannot infer the input size of ViT \(patch grid unknown\).*pass images= explicitly"
    ):
        residual_stream_norm(net2)  # 2 x 3 tokens of a perceptron ViT: the grid is not recoverable
    assert residual_stream_norm(net2, torch.rand(1, 1, 32, 48)) > 0
