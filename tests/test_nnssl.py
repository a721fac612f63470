"""nnssl checkpoints (Primus / EvaMAE encoders) read as monai-mae model files, and written from ours.

The fixtures (``tests/fixtures/make_nnssl_fixture.py``) are tiny random encoders built with
dynamic-network-architectures 0.4.4 / timm 1.0.22 and saved in nnssl's checkpoint layout, with each encoder's
features on one input; these tests need neither package.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from monai_mae import load_mae_encoder
from monai_mae.data import load_data_preset
from monai_mae.model_file import build_network, data_preset_for, encoder_settings, read_model
from monai_mae.networks.checkpoint_io import read_checkpoint, read_nnssl_checkpoint
from monai_mae.networks.nnssl import (
    nnssl_checkpoint,
    nnssl_configuration,
    nnssl_data_preset,
    nnssl_model_file,
    save_nnssl_checkpoint,
    token_order_of,
)
from monai_mae.networks.presets import mae_vit, vitseg_preset
from monai_mae.networks.vitseg import ViTSeg

FIXTURES = Path(__file__).parent / "fixtures"
FILES = {"primus": FIXTURES / "primus_checkpoint_final.pth", "evamae": FIXTURES / "evamae_checkpoint_final.pth"}
RAS = (2, 1, 0)  # the default: nnssl's (z, y, x) arrays -> our RAS (x, y, z) axes


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(FIXTURES / "nnssl_reference.pt", weights_only=True)


def raw(name: str) -> dict:
    return torch.load(FILES[name], weights_only=True)


def to_axes(tensor: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``(B, C, *S)`` over nnssl's axes -> over ours (our axis ``j`` is nnssl's ``axes[j]``)."""
    return tensor.permute(0, 1, *(2 + a for a in axes))


def vitseg_of(model: dict) -> ViTSeg:
    """A ViTSeg built from the model file's encoder description, its encoder loaded with load_mae_encoder."""
    network = {k: v for k, v in model["monai_mae"]["network"].items() if k != "_target_"}
    net = ViTSeg(out_channels=2, **network).eval()
    report = load_mae_encoder(net, model)
    assert not report.missing
    return net


def features(net: ViTSeg, x: torch.Tensor) -> torch.Tensor:
    """Encoder tokens as a grid ``(B, C, *G)`` over the input's axes."""
    with torch.no_grad():
        tokens, _ = net.forward_features(x)
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, *net.grid_size)


# ------------------------------------------------------------------ features equal the reference
@pytest.mark.parametrize("name, order", [("primus", "whd"), ("evamae", "hwd")])
@pytest.mark.parametrize("axes", [RAS, (0, 1, 2), (1, 2, 0)])
def test_imported_encoder_computes_the_reference_features(reference, name, order, axes):
    model = read_nnssl_checkpoint(FILES[name], num_heads=3, axes=axes)
    assert model["monai_mae"]["run"]["token_order"] == order  # told by the file
    net = vitseg_of(model)
    x = to_axes(reference["input"].float(), axes)
    torch.testing.assert_close(features(net, x), to_axes(reference[name], axes), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, wrong", [("primus", "hwd"), ("evamae", "whd")])
def test_the_token_order_matters(reference, name, wrong):
    net = vitseg_of(read_nnssl_checkpoint(FILES[name], num_heads=3, token_order=wrong))
    x = to_axes(reference["input"].float(), RAS)
    assert (features(net, x) - to_axes(reference[name], RAS)).abs().max().item() > 1e-2


def test_token_order_is_read_from_the_file():
    primus, evamae = raw("primus"), raw("evamae")
    assert (token_order_of(primus), token_order_of(evamae)) == ("whd", "hwd")  # SimMIMEvaTrainer, BaseEvaMAETrainer
    del evamae["trainer_name"]
    assert token_order_of(evamae) == "hwd"  # EvaMAE's decoder blocks
    del primus["trainer_name"]
    assert token_order_of(primus) is None
    with pytest.raises(ValueError, match=r"token_order of the nnssl checkpoint is None: .* pass token_order='whd'"):
        nnssl_model_file(primus, num_heads=3)
    assert nnssl_model_file(primus, num_heads=3, token_order="whd")["monai_mae"]["run"]["token_order"] == "whd"
    with pytest.raises(ValueError, match="token_order .* is 'dhw'"):
        nnssl_model_file(raw("primus"), num_heads=3, token_order="dhw")


def test_description_is_the_primus_exact_encoder():
    model = read_nnssl_checkpoint(FILES["evamae"], num_heads=3)
    network = model["monai_mae"]["network"]
    assert network == {
        "_target_": "monai_mae.networks.encoder.ViTEncoder",
        "in_channels": 1,
        "img_size": [32, 32, 32],
        "patch_size": [8, 8, 8],
        "hidden_size": 36,
        "mlp_dim": 96,
        "num_layers": 2,
        "num_heads": 3,
        "qkv_bias": "qv",
        "proj_type": "conv",
        "pos_embed_type": "rope",
        "mlp_type": "swiglu",
        "layer_scale_init": 0.1,
        "rope_theta": 10000.0,
        "attn_norm": True,
        "mlp_norm": True,
        "abs_pos_embed": True,
        "spatial_dims": 3,
    }
    assert not any(k.startswith(("decoder", "mask_token", "up_projection")) for k in model["network"])
    encoder = build_network(read_model(model)).eval()  # the description rebuilds its encoder, strictly loaded
    assert encoder.blocks[1].attn.num_heads == 3


# ------------------------------------------------------------------ plan -> data preset
def test_plan_becomes_the_data_preset():
    primus_plan = raw("primus")["nnssl_adaptation_plan"]  # configurations: {"onemmiso": {...}}
    assert nnssl_data_preset(primus_plan) == {
        "modality": "mri",
        "pixdim": [1.5, 1.25, 1.0],
        "orientation": "RAS",
        "in_channels": 1,
        "spatial_dims": 3,
        "roi_size": [32, 32, 32],
    }
    assert nnssl_data_preset(primus_plan, axes=(0, 1, 2))["pixdim"] == [1.0, 1.25, 1.5]  # nnssl's array order
    transposed = copy.deepcopy(primus_plan)
    transposed["pretrain_plan"]["transpose_forward"] = [2, 1, 0]  # arrays already (x, y, z)
    assert nnssl_data_preset(transposed)["pixdim"] == [1.0, 1.25, 1.5]
    evamae_plan = raw("evamae")["nnssl_adaptation_plan"]  # configurations: one configuration
    assert "spacing" in evamae_plan["pretrain_plan"]["configurations"]
    assert nnssl_data_preset(evamae_plan)["pixdim"] == [1.0, 1.0, 1.0]


def test_named_configurations():
    plan = raw("primus")["nnssl_adaptation_plan"]
    configurations = plan["pretrain_plan"]["configurations"]
    configurations["median"] = {**configurations["onemmiso"], "spacing": [2.0, 1.0, 1.0]}
    assert nnssl_configuration(plan)["spacing"] == [1.0, 1.25, 1.5]  # onemmiso among several
    assert nnssl_data_preset(plan, "median")["pixdim"] == [1.0, 1.0, 2.0]
    configurations["other"] = configurations.pop("onemmiso")
    with pytest.raises(ValueError, match=r"configurations \['median', 'other'\]; pass configuration="):
        nnssl_configuration(plan)
    with pytest.raises(ValueError, match="pass configuration="):
        nnssl_configuration(plan, "3d_fullres")


def test_model_file_readers_take_the_plan(tmp_path):
    torch.save(read_nnssl_checkpoint(FILES["primus"], num_heads=3), tmp_path / "model.pt")
    preset = data_preset_for(tmp_path / "model.pt")
    assert preset["modality"] == "mri" and preset["pixdim"] == [1.5, 1.25, 1.0]
    packaged = load_data_preset("mri")  # what the plan does not say (augmentation, samples) is the packaged preset's
    assert (preset["flip_prob"], preset["num_samples"]) == (packaged["flip_prob"], packaged["num_samples"])
    with pytest.raises(ValueError, match=r"pixdim=\[1.0, 1.0, 1.0\] \(given\) vs pixdim=\[1.5, 1.25, 1.0\]"):
        data_preset_for(tmp_path / "model.pt", pixdim=[1.0, 1.0, 1.0])
    settings = encoder_settings(tmp_path / "model.pt", "vitseg")
    assert (settings["hidden_size"], settings["num_heads"], settings["qkv_bias"]) == (36, 3, "qv")


# ------------------------------------------------------------------ bad files
def _resenc() -> dict:
    obj = raw("primus")
    plan = obj["nnssl_adaptation_plan"]
    plan["architecture_plans"]["arch_class_name"] = "ResEncL"
    plan.update(key_to_encoder="encoder.stages", key_to_stem="encoder.stem")
    obj["network_weights"] = {"encoder.stem.convs.0.conv.weight": torch.zeros(32, 1, 3, 3, 3)}
    return obj


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda o: o.update(_resenc()), r"holds a CNN \('ResEncL'\); monai-mae reads .* \(PrimusS, PrimusB, PrimusM"),
        (
            lambda o: o["nnssl_adaptation_plan"]["pretrain_plan"]["configurations"]["onemmiso"].update(
                normalization_schemes=["CTNormalization"]
            ),
            r"normalises with \['CTNormalization'\]",
        ),
        (
            lambda o: o["network_weights"].pop("down_projection.proj.weight"),
            "no patch embedding "
            r"'down_projection.proj.weight' .* \(Primus V2 / V3 stems are not supported\)",
        ),
        (lambda o: o["network_weights"].update(register_tokens=torch.zeros(1, 4, 36)), "register tokens"),
        (
            lambda o: o["network_weights"].pop("eva.blocks.1.attn.q_proj.weight"),
            r"block 1 has no 'attn.q_proj.weight'; monai-mae reads EVA blocks with separate q/k/v projections",
        ),
        (lambda o: o["network_weights"].pop("eva.norm.weight"), r"no final norm 'eva.norm.weight'"),
    ],
)
def test_bad_files_raise(change, match):
    obj = raw("primus")
    change(obj)
    with pytest.raises(ValueError, match=match):
        nnssl_model_file(obj, num_heads=3)


def test_heads_come_from_the_architecture_name(tmp_path):
    with pytest.raises(ValueError, match=r"names architecture 'PrimusM' \(width 864\) but its encoder has width 36"):
        read_nnssl_checkpoint(FILES["primus"])
    with pytest.raises(ValueError, match="num_heads=5 does not divide the width 36"):
        read_nnssl_checkpoint(FILES["primus"], num_heads=5)
    # a real size: the name tells the heads
    net = vitseg_preset("primus_s", 1, 2, img_size=16, num_layers=1)
    save_nnssl_checkpoint(net, tmp_path / "checkpoint_final.pth")
    assert read_nnssl_checkpoint(tmp_path / "checkpoint_final.pth")["monai_mae"]["network"]["num_heads"] == 6


def test_paths_name_the_file(tmp_path):
    torch.save(_resenc(), tmp_path / "resenc.pth")
    net = ViTSeg(1, 2, 32, hidden_size=36, mlp_dim=96, num_layers=2, num_heads=3)
    with pytest.raises(ValueError, match=r"checkpoint file '.*resenc.pth': .* holds a CNN \('ResEncL'\)"):
        load_mae_encoder(net, tmp_path / "resenc.pth")
    with pytest.raises(ValueError, match=r"nnssl checkpoint '.*resenc.pth' holds a CNN"):
        read_model(tmp_path / "resenc.pth")
    with pytest.raises(FileNotFoundError, match="nnssl checkpoint not found"):
        read_nnssl_checkpoint(tmp_path / "missing.pth")
    torch.save({**raw("primus"), "init_args": {"device": Path("not/allowed")}}, tmp_path / "pickled.pth")
    with pytest.raises(
        ValueError, match=r"(?s)'.*pickled.pth' with torch.load\(weights_only=True\): .* If you trust the"
    ):
        read_nnssl_checkpoint(tmp_path / "pickled.pth")


# ------------------------------------------------------------------ monai-mae -> nnssl
def _primus_keys(obj: dict) -> dict[str, tuple[int, ...]]:
    """What nnU-Net's Primus loads from an nnssl checkpoint: its stem and encoder."""
    weights = obj["network_weights"]
    return {k: tuple(v.shape) for k, v in weights.items() if k.startswith(("eva.", "down_projection."))}


@pytest.mark.parametrize("axes", [RAS, (0, 1, 2), (1, 2, 0)])
def test_export_of_an_imported_primus_reproduces_its_weights(axes):
    original = raw("primus")
    model = nnssl_model_file(original, num_heads=3, axes=axes)
    net = vitseg_of(model)
    exported = nnssl_checkpoint(net, model["monai_mae"]["data_preset"], axes=axes, architecture="PrimusM")
    assert _primus_keys(exported) == _primus_keys(original)  # a strict load of eva.* and down_projection.*
    for key in _primus_keys(original):
        assert torch.equal(exported["network_weights"][key], original["network_weights"][key]), key
    plan, source = exported["nnssl_adaptation_plan"], original["nnssl_adaptation_plan"]
    assert nnssl_configuration(plan)["spacing"] == nnssl_configuration(source)["spacing"]  # nnssl's array order
    # transpose_forward records the axes: the exported plan reads back as the preset it was written from
    assert nnssl_data_preset(plan) == model["monai_mae"]["data_preset"]
    assert token_order_of(exported) == "whd"


@pytest.mark.parametrize("cls", ["mae", "vitseg"])
def test_export_and_reimport_give_equal_features(tmp_path, cls):
    torch.manual_seed(0)
    kwargs = dict(img_size=(16, 24, 32), num_layers=2)
    net = mae_vit("primus_s", patch_size=8, **kwargs) if cls == "mae" else vitseg_preset("primus_s", 1, 2, **kwargs)
    net.eval()
    preset = {"modality": "mri", "pixdim": [0.8, 0.9, 1.2], "roi_size": [16, 24, 32]}
    path = save_nnssl_checkpoint(net, tmp_path / "checkpoint_final.pth", preset)
    saved = torch.load(path, weights_only=True)
    assert saved["nnssl_adaptation_plan"]["architecture_plans"]["arch_class_name"] == "PrimusS"
    assert saved["nnssl_adaptation_plan"]["pretrain_plan"]["configurations"]["onemmiso"]["spacing"] == [1.2, 0.9, 0.8]
    assert saved["network_weights"]["eva.pos_embed"].shape == (1, 24, 396)
    model = read_model(path)
    assert model.data_preset["pixdim"] == [0.8, 0.9, 1.2] and model.network["img_size"] == [16, 24, 32]
    seg = vitseg_of(read_nnssl_checkpoint(path))
    x = torch.randn(1, 1, 16, 24, 32)
    with torch.no_grad():
        expected = net.forward_encoder(x) if cls == "mae" else net.forward_features(x)[0]
        torch.testing.assert_close(seg.forward_features(x)[0], expected, rtol=0, atol=1e-5)


def test_export_refuses_what_nnssl_cannot_hold():
    with pytest.raises(ValueError, match="needs .* and no class token"):
        nnssl_checkpoint(mae_vit("tiny", img_size=16, patch_size=8, num_layers=1))
    odd = vitseg_preset("primus_s", 1, 2, img_size=16, num_layers=1, hidden_size=36, num_heads=3, mlp_dim=96)
    with pytest.raises(ValueError, match="the encoder is 36 wide, 3 heads"):
        nnssl_checkpoint(odd)
    with pytest.raises(ValueError, match="modality 'mri'"):
        nnssl_checkpoint(vitseg_preset("primus_s", 1, 2, img_size=16, num_layers=1), {"modality": "ct"})
    found = read_checkpoint(nnssl_checkpoint(vitseg_preset("primus_s", 1, 2, img_size=16, num_layers=1)))
    assert found.layouts == ("nnssl checkpoint",) and found.pos_embed_type == "rope" and found.grid == (2, 2, 2)
