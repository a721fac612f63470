from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from monai_mae import MAE_PRESETS, MAEViT, get_preset, mae_vit
from monai_mae.networks.presets import (
    ENCODER_PRESET_KEYS,
    encoder_preset,
    mae_vit_tiny,
    preset_config,
    vitseg_preset,
    write_preset_configs,
)
from monai_mae.networks.vitseg import ViTSeg

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PRETRAIN = REPO / "bundles" / "mae_pretrain" / "configs"
PRIMUS = {  # name: (width, depth, heads), Wald et al., arXiv 2503.01835
    "primus_s": (396, 12, 6), "primus_b": (792, 12, 12), "primus_m": (864, 16, 12), "primus_l": (1056, 24, 16),
}  # fmt: skip
# arguments the bundle's network_def takes from flat settings (not sizes)
BUNDLE_WIRING = {
    "_target_",
    "in_channels",
    "img_size",
    "patch_size",
    "spatial_dims",
    "masking_ratio",
    "decoder_type",
    "decoder_predict_ratio",
}


@pytest.mark.parametrize("name", sorted(MAE_PRESETS))
def test_config_files_mirror_presets(name):
    data = json.loads((CONFIGS / f"model_{name}.json").read_text())
    assert data == preset_config(name)
    data.pop("_comment")
    assert {k.removeprefix("network_def#"): v for k, v in data.items()} == MAE_PRESETS[name]
    assert all(k.startswith("network_def#") for k in data)


def test_config_files_are_exactly_the_presets(tmp_path):
    assert {p.name for p in CONFIGS.glob("model_*.json")} == {f"model_{name}.json" for name in MAE_PRESETS}
    for path in write_preset_configs(tmp_path):  # what regenerating would write, byte for byte
        assert path.read_text() == (CONFIGS / path.name).read_text()


def test_bundle_default_network_is_the_base_preset():
    network_def = json.loads((PRETRAIN / "train.json").read_text())["network_def"]
    assert {k: v for k, v in network_def.items() if k not in BUNDLE_WIRING} == MAE_PRESETS["base"]
    assert network_def["_target_"] == "monai_mae.networks.mae.MAEViT"


@pytest.mark.parametrize("name", sorted(MAE_PRESETS))
def test_config_file_layered_on_the_bundle_sets_network_def(name):
    parser = ConfigParser()
    parser.read_config([str(PRETRAIN / "train.json"), str(CONFIGS / f"model_{name}.json")])
    network_def = parser.get("network_def")
    assert {k: v for k, v in network_def.items() if k not in BUNDLE_WIRING} == MAE_PRESETS[name]


def test_primus_config_builds_through_the_bundle():
    parser = ConfigParser()
    parser.read_config([str(PRETRAIN / "train.json"), str(CONFIGS / "model_primus_s.json")])
    parser.update({"roi_size": [16, 16, 16], "patch_size": [8, 8, 8], "network_def#num_layers": 1})
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, MAEViT) and net.cls_token is None and net.use_rope and net.hidden_size == 396
    assert net.init_args["mlp_type"] == "swiglu" and net.init_args["layer_scale_init"] == 0.1


def test_paper_sizes():
    assert get_preset("base")["hidden_size"] == 768 and get_preset("base")["num_layers"] == 12
    assert get_preset("large")["hidden_size"] == 1024 and get_preset("large")["num_layers"] == 24
    for name in ("base", "large"):
        assert (get_preset(name)["decoder_hidden_size"], get_preset(name)["decoder_num_layers"]) == (512, 8)
    assert all(MAE_PRESETS[name]["qkv_bias"] for name in MAE_PRESETS)
    assert get_preset("small", num_layers=2)["num_layers"] == 2


@pytest.mark.parametrize("name", sorted(PRIMUS))
def test_primus_sizes(name):
    preset = get_preset(name)
    width, depth, heads = PRIMUS[name]
    assert (preset["hidden_size"], preset["num_layers"], preset["num_heads"]) == (width, depth, heads)
    assert preset["mlp_dim"] * 3 == width * 8  # SwiGLU hidden units: 8/3 x width, a 4x GELU MLP's parameters
    assert (width // heads) % 6 == 0  # 3D axial RoPE rotates every channel of a head
    assert preset["decoder_hidden_size"] % preset["decoder_num_heads"] == 0
    assert {k: preset[k] for k in ("pos_embed_type", "mlp_type", "layer_scale_init", "cls_token", "qkv_bias")} == {
        "pos_embed_type": "rope", "mlp_type": "swiglu", "layer_scale_init": 0.1, "cls_token": False, "qkv_bias": "qv",
    }  # fmt: skip
    # Primus' own blocks: attention and MLP sub-norms, an absolute table with RoPE, RoPE base 10000
    assert {k: preset[k] for k in ("attn_norm", "mlp_norm", "abs_pos_embed", "rope_theta")} == {
        "attn_norm": True,
        "mlp_norm": True,
        "abs_pos_embed": True,
        "rope_theta": 10000.0,
    }


@pytest.mark.parametrize("name", sorted(MAE_PRESETS))
def test_every_preset_has_the_right_shapes(name):
    """Built on the meta device (no memory, no init cost): the parameter shapes the preset promises."""
    preset = get_preset(name)
    width, depth, mlp = preset["hidden_size"], preset["num_layers"], preset["mlp_dim"]
    with torch.device("meta"):
        net = mae_vit(name, img_size=16, patch_size=8)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    gated = 2 if preset.get("mlp_type") == "swiglu" else 1
    assert shapes[f"blocks.{depth - 1}.mlp.linear1.weight"] == (gated * mlp, width)
    if preset["qkv_bias"] == "qv":  # Primus: biases on queries and values, none on keys
        assert shapes[f"blocks.{depth - 1}.attn.q_bias"] == shapes[f"blocks.{depth - 1}.attn.v_bias"] == (width,)
        assert f"blocks.{depth - 1}.attn.qkv.bias" not in shapes
    else:
        assert shapes[f"blocks.{depth - 1}.attn.qkv.bias"] == (3 * width,)
    assert (f"blocks.{depth - 1}.attn.norm.weight" in shapes) == preset.get("attn_norm", False)
    assert (f"blocks.{depth - 1}.mlp.norm.weight" in shapes) == preset.get("mlp_norm", False)
    assert f"blocks.{depth}.norm1.weight" not in shapes
    decoder_depth, decoder_width = preset["decoder_num_layers"], preset["decoder_hidden_size"]
    assert shapes[f"decoder_blocks.{decoder_depth - 1}.norm1.weight"] == (decoder_width,)
    assert f"decoder_blocks.{decoder_depth}.norm1.weight" not in shapes
    assert ("blocks.0.ls1.gamma" in shapes) == ("layer_scale_init" in preset)
    assert ("cls_token" in shapes) == preset.get("cls_token", True)


@pytest.mark.parametrize("name", ["tiny", "primus_s"])
@pytest.mark.parametrize("nd, size", [(2, (16, 16)), (3, (16, 16, 16))])
def test_small_presets_build_and_run(name, nd, size):
    net = mae_vit(name, img_size=size, patch_size=8, spatial_dims=nd, num_layers=1)
    assert isinstance(net, MAEViT) and net.hidden_size == get_preset(name)["hidden_size"]
    pred, mask = net(torch.randn(1, 1, *size))
    assert pred.shape == (1, net.patch_embedding.n_patches, 8**nd) and mask.shape == (1, 2**nd)


def test_tiny_builds_and_runs_anisotropic():
    net = mae_vit_tiny(img_size=(32, 32, 16), patch_size=8, num_layers=1)
    pred, _ = net(torch.randn(1, 1, 32, 32, 16))
    assert pred.shape == (1, 32, 512)


def test_encoder_preset_is_the_encoder_part():
    assert encoder_preset("primus_m") == {k: MAE_PRESETS["primus_m"][k] for k in ENCODER_PRESET_KEYS}
    assert encoder_preset("base") == dict(hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12, qkv_bias=True)
    assert encoder_preset("small", num_layers=2)["num_layers"] == 2


@pytest.mark.parametrize("name", ["tiny", "primus_s"])
def test_vitseg_preset_has_the_mae_encoder(name):
    seg = vitseg_preset(name, 1, 3, img_size=16, num_layers=2)
    mae = mae_vit(name, img_size=16, patch_size=8, num_layers=2)
    assert isinstance(seg, ViTSeg) and seg.patch_size == (8, 8, 8)
    mae_shapes = {k: tuple(v.shape) for k, v in mae.state_dict().items()}
    encoder_prefixes = ("patch_embedding.", "blocks.", "norm.")
    encoder = {k: tuple(v.shape) for k, v in seg.state_dict().items() if k.startswith(encoder_prefixes)}
    assert encoder == {k: mae_shapes[k] for k in encoder}  # every ViTSeg encoder tensor is in the MAE, same shape
    seg.load_state_dict({k: v for k, v in mae.state_dict().items() if k in encoder}, strict=False)
    mae.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    if not get_preset(name).get("cls_token", True):  # no class token: the same encoder computes the same tokens
        torch.testing.assert_close(seg.forward_features(x)[0], mae.forward_encoder(x)[:, mae.num_prefix_tokens :])
    assert seg(x).shape == (1, 3, 16, 16, 16)


def test_vitseg_preset_overrides_and_meta_build():
    with torch.device("meta"):
        net = vitseg_preset("primus_l", 1, 2, img_size=(32, 32, 16), drop_path_rate=0.2)
    assert net.hidden_size == 1056 and len(net.blocks) == 24 and net.init_args["drop_path_rate"] == 0.2


@pytest.mark.parametrize("build", [mae_vit, encoder_preset, lambda name: vitseg_preset(name, 1, 2, 16)])
def test_unknown_preset(build):
    with pytest.raises(ValueError, match="huge"):
        build("huge")
