"""Self-describing model files: round trip of the description, rebuilding, conflicts, old state dicts."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR

from monai_mae import MAEViT
from monai_mae.data import load_data_preset
from monai_mae.model_file import (
    FORMAT_VERSION,
    build_network,
    data_preset_for,
    encoder_settings,
    network_spec,
    read_model,
    save_model,
)
from monai_mae.networks.factory import segmentation_network
from monai_mae.networks.vitseg import ViTSeg
from monai_mae.version import __version__

SMALL = dict(hidden_size=24, mlp_dim=48, num_layers=2, num_heads=2, qkv_bias=True)
DECODER = dict(decoder_hidden_size=16, decoder_mlp_dim=32, decoder_num_layers=1, decoder_num_heads=2)


def _rope_mae() -> MAEViT:
    return MAEViT(1, 32, 8, **SMALL, **DECODER, pos_embed_type="rope", mlp_type="swiglu", layer_scale_init=0.1,
                  cls_token=False)  # fmt: skip


@pytest.fixture
def mae_file(tmp_path):
    preset = {**load_data_preset("mri"), "roi_size": [32, 32, 32], "spatial_dims": 3, "in_channels": 1}
    mae = _rope_mae()
    return save_model(mae, tmp_path / "models" / "model.pt", data_preset=preset, run={"epoch": 3}), mae


def test_round_trip_of_weights_and_description(mae_file):
    path, mae = mae_file
    model = read_model(path)
    assert model.describes and model.network["_target_"] == "monai_mae.networks.mae.MAEViT"
    assert (model.network["pos_embed_type"], model.network["mlp_type"], model.network["cls_token"]) == (
        "rope",
        "swiglu",
        False,
    )
    assert model.data_preset["modality"] == "mri" and model.data_preset["roi_size"] == [32, 32, 32]
    assert model.run == {"epoch": 3} and model.version
    assert all(torch.equal(model.state_dict[k], v) for k, v in mae.state_dict().items())
    rebuilt = build_network(path).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(rebuilt(x, generator=generator())[0], mae.eval()(x, generator=generator())[0])


def test_mapped_read_for_descriptions_matches_and_legacy_files_still_read(mae_file, tmp_path):
    path, mae = mae_file
    mapped, full = read_model(path, mmap=True), read_model(path)
    assert (mapped.network, mapped.data_preset, mapped.run) == (full.network, full.data_preset, full.run)
    assert all(torch.equal(mapped.state_dict[k], v) for k, v in full.state_dict.items())
    torch.save(torch.load(path, weights_only=True), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = read_model(tmp_path / "legacy.pt", mmap=True)  # torch cannot map the old format: read as usual
    assert legacy.network == full.network and torch.equal(
        legacy.state_dict["norm.weight"], mae.state_dict()["norm.weight"]
    )


def test_plain_state_dicts_still_load_but_describe_nothing(tmp_path):
    torch.save(_rope_mae().state_dict(), tmp_path / "plain.pt")
    model = read_model(tmp_path / "plain.pt")
    assert not model.describes and model.network is None and "patch_embedding.position_embeddings" in model.state_dict
    assert encoder_settings(tmp_path / "plain.pt", "vitseg", {"hidden_size": 24}) == {"hidden_size": 24}
    with pytest.raises(ValueError, match="plain state dict without a network description"):
        build_network(tmp_path / "plain.pt")
    assert network_spec(torch.nn.Linear(2, 2)) is None


def test_encoder_and_data_settings_come_from_the_file_and_conflicts_are_named(mae_file):
    path, _ = mae_file
    settings = encoder_settings(path, "vitseg", {"hidden_size": None}, defaults={"qkv_bias": False})
    assert settings["hidden_size"] == 24 and settings["patch_size"] == 8 and settings["qkv_bias"] is True
    seg = segmentation_network("vitseg", 1, 3, 32, encoder=settings)
    assert isinstance(seg, ViTSeg) and seg.patch_embedding.pos_embed_type == "rope"
    with pytest.raises(ValueError, match=r"hidden_size=48 \(given\) vs hidden_size=24 \(in '.*model.pt'\)"):
        encoder_settings(path, "vitseg", {"hidden_size": 48})
    with pytest.raises(
        ValueError, match=r"cannot be built as MONAI's UNETR: num_layers=2 \(UNETR has 12\), patch_size=8"
    ):
        encoder_settings(path, "unetr")
    assert data_preset_for(path)["modality"] == "mri"
    assert data_preset_for(read_model(path)) == data_preset_for(path)  # a file read once serves both configs' items
    with pytest.raises(ValueError, match=r"modality='ct' \(given\) vs modality='mri'"):
        data_preset_for(path, "ct")
    assert data_preset_for("", None)["modality"] == "ct"  # no file: the packaged preset
    with pytest.raises(ValueError, match=r"network settings contradict .*num_layers=3 \(given\) vs num_layers=2"):
        build_network(path, num_layers=3)
    assert build_network(path, load_weights=False, img_size=64).img_size == (64, 64, 64)  # shape-free setting


def test_unetr_from_the_factory_is_described_and_rebuilt(tmp_path):
    net = segmentation_network("unetr", 1, 3, 32, encoder={"hidden_size": 24, "mlp_dim": 48, "num_heads": 2},
                               options={"feature_size": 4, "dropout_rate": None})  # fmt: skip
    assert isinstance(net, UNETR) and network_spec(net)["_target_"] == "monai.networks.nets.UNETR"
    path = save_model(torch.nn.parallel.DataParallel(net), tmp_path / "unetr.pt")  # wrappers are unwrapped
    assert isinstance(build_network(path), UNETR)
    with pytest.raises(ValueError, match="in_channels=2 differs from the encoder's in_channels"):
        segmentation_network("vitseg", 2, 3, 32, encoder={"in_channels": 1, **SMALL})


def test_files_carry_their_format_version_and_a_newer_format_is_refused_by_name(mae_file, tmp_path):
    path, _ = mae_file
    content = torch.load(path, weights_only=True)
    assert read_model(path).format_version == FORMAT_VERSION == content["monai_mae"]["format_version"]
    del content["monai_mae"]["format_version"]  # a file of monai-mae 0.1.0: read as before
    torch.save(content, tmp_path / "old.pt")
    assert read_model(tmp_path / "old.pt").format_version is None and build_network(tmp_path / "old.pt") is not None
    newer = FORMAT_VERSION + 1
    content["monai_mae"].update(format_version=newer, version="9.0.0")
    torch.save(content, tmp_path / "newer.pt")
    expected = (
        rf"'.*newer.pt' has model-file format {newer} \(written by monai-mae 9.0.0\), but monai-mae "
        rf"{__version__} reads formats up to {FORMAT_VERSION}; upgrade monai-mae"
    )
    for read in (read_model, build_network, data_preset_for, lambda p: encoder_settings(p, "vitseg")):
        with pytest.raises(ValueError, match=expected):
            read(tmp_path / "newer.pt")
    content["monai_mae"]["format_version"] = "2"
    torch.save(content, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"format_version '2'; expected an int >= 1"):
        read_model(tmp_path / "odd.pt")


def test_a_network_setting_the_file_does_not_record_is_refused_by_name(mae_file):
    path, _ = mae_file
    with pytest.raises(ValueError, match=r"settings \['feature_size'\] are not arguments recorded in '.*model.pt'"):
        build_network(path, load_weights=False, feature_size=8)
    assert build_network(path, load_weights=False, hidden_size=24).hidden_size == 24  # recorded and equal: accepted
