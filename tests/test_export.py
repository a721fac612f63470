"""``monai-mae export RUN OUT``: a run folder becomes a MONAI model-zoo bundle that stands on its own.

Runs are made in-process (model files as the bundles write them); the subprocess chain
synth -> pretrain -> finetune -> export is in test_cli.py (slow).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from bundle_utils import REPO
from monai.bundle import ckpt_export, load, verify_metadata
from test_bundle_tooling import META_SCHEMA

from monai_mae import MAEViT
from monai_mae.data import load_data_preset
from monai_mae.export import RUN_SETTINGS_NAME, export_run
from monai_mae.model_file import build_network, encoder_settings, read_model, save_model
from monai_mae.networks.factory import segmentation_network
from monai_mae.packaged import bundle_dir
from monai_mae.version import __version__

SEG = {
    "vitseg": {
        "encoder": {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "num_layers": 2},
        "options": {"decoder_channels": [16, 8, 8]},
    },
    "unetr": {"encoder": {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4}, "options": {"feature_size": 8}},
}
PRESET = {**load_data_preset("ct"), "roi_size": [32, 32, 32], "spatial_dims": 3, "in_channels": 1, "orientation": "RAS"}


@pytest.fixture
def restore_logging():
    """monai.bundle.load applies the bundle's logging.conf to the root logger; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _seg_run(tmp_path, architecture: str):
    """A fine-tuning run folder as mae_finetune leaves it: final and best model, evaluate's metrics.json, settings."""
    run = tmp_path / "runs" / f"seg_{architecture}"
    net = segmentation_network(architecture, 1, 3, 32, **SEG[architecture]).eval()
    preset = {**PRESET, "num_classes": 3, "class_names": ["liver", "kidney"]}
    mae = tmp_path / "runs" / "mae" / "models" / "model.pt"
    facts = {"bundle": "mae_finetune", "output_dir": str(run), "pretrained_ckpt": str(mae)}
    save_model(net, run / "models" / "model.pt", data_preset=preset, run={**facts, "epoch": 4})
    best = {**facts, "epoch": 3, "val_mean_dice": 0.625}
    save_model(net, run / "models" / "model_best.pt", data_preset=preset, run=best)
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(
        json.dumps(
            {"metrics": {"val_mean_dice": 0.5, "val_dice_liver": 0.75}, "num_cases": 2, "datalist_key": "validation"}
        )
    )
    data = tmp_path / "data"
    (run / RUN_SETTINGS_NAME).write_text(
        json.dumps(
            {
                "bundle": "mae_finetune",
                "settings": {
                    "dataset_dir": str(data),
                    "output_dir": str(run),
                    "max_epochs": 4,
                    "network_def#options": {"x": 1},
                },
            }
        )
    )
    return run, net


@pytest.mark.parametrize(
    "architecture", [pytest.param(a, marks=pytest.mark.slow) if a == "unetr" else a for a in sorted(SEG)]
)  # UNETR's scripted export is the costliest: only in `make test`
def test_a_segmentation_run_exports_to_a_bundle_that_stands_on_its_own(
    architecture, tmp_path, restore_logging, monkeypatch
):
    run, net = _seg_run(tmp_path, architecture)
    out = export_run(run, tmp_path / "shared" / "liver_seg")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "LICENSE",
        "configs/inference.json",
        "configs/logging.conf",
        "configs/metadata.json",
        "docs/README.md",
        "models/model.pt",
    ]
    assert (out / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    names = ("configs/inference.json", "configs/metadata.json", "docs/README.md")
    texts = {name: (out / name).read_text() for name in names}
    for text in texts.values():  # no path into the run, the repository or the package
        assert str(tmp_path) not in text and str(REPO) not in text and str(bundle_dir("mae_finetune")) not in text

    config = json.loads(texts["configs/inference.json"])
    assert config["network_def"] == read_model(run / "models" / "model_best.pt").network  # the best model, written in
    assert (config["roi_size"], config["spatial_dims"], config["num_classes"]) == ([32, 32, 32], 3, 3)
    assert config["data_preset"]["class_names"] == ["liver", "kidney"] and config["synthetic_if_missing"] is False
    assert "model_file" not in config and config["ckpt_path"] == "$os.path.join(@bundle_root, 'models', 'model.pt')"
    exported = read_model(out / "models" / "model.pt")
    assert exported.run["output_dir"] == run.name and exported.run["pretrained_ckpt"] == "model.pt"  # folders cut
    assert exported.run["val_mean_dice"] == 0.625

    schema = tmp_path / "schema.json"  # the model-zoo schema's required fields (test_bundle_tooling), offline
    schema.write_text(json.dumps(META_SCHEMA))
    verify_metadata(meta_file=str(out / "configs" / "metadata.json"), filepath=str(schema))
    meta = json.loads(texts["configs/metadata.json"])
    assert meta["required_packages_version"]["monai-mae"] == __version__ and meta["name"] == "liver_seg"
    classes = {"0": "background", "1": "liver", "2": "kidney"}
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == classes
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, 32]

    readme = texts["docs/README.md"]
    assert "- `val_mean_dice` 0.6250 at epoch 3" in readme
    assert "- `val_dice_liver` 0.7500 (`monai-mae evaluate`, 2 cases" in readme
    assert "the folder `data`" in readme and "`max_epochs=4`" in readme and "initialised from `model.pt`" in readme

    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = net(x)
    export_args = {"use_trace": True, "input_shape": [1, 1, 32, 32, 32]} if architecture == "vitseg" else {}
    ckpt_export(
        net_id="network_def",
        filepath=str(out / "models" / "model.ts"),
        ckpt_file=str(out / "models" / "model.pt"),
        key_in_ckpt="network",
        meta_file=str(out / "configs" / "metadata.json"),
        config_file=str(out / "configs" / "inference.json"),
        bundle_root=str(out),
        **export_args,
    )
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(out / "models" / "model.ts"))(x), expected, atol=1e-5)

    monkeypatch.chdir(tmp_path)  # load() reads configs/inference.json with bundle_root "." and runs its initialize
    loaded = load(
        "liver_seg", bundle_dir=str(tmp_path / "shared"), workflow_type="inference", key_in_ckpt="network", device="cpu"
    )
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), expected, atol=1e-6)
    assert not (tmp_path / "data").exists()  # initialize made up no data


def test_an_mae_run_exports_and_fine_tuning_starts_from_the_export(tmp_path):
    run = tmp_path / "mae"
    mae = MAEViT(
        1,
        32,
        8,
        hidden_size=24,
        mlp_dim=48,
        num_layers=2,
        num_heads=2,
        decoder_hidden_size=16,
        decoder_mlp_dim=32,
        decoder_num_layers=1,
        decoder_num_heads=2,
        qkv_bias=True,
    )
    facts = {"bundle": "mae_pretrain", "output_dir": str(run), "masking_ratio": 0.6, "norm_pix_loss": True, "epoch": 2}
    save_model(mae, run / "models" / "model.pt", data_preset=PRESET, run=facts)
    out = export_run(run, tmp_path / "mae_bundle", name="phantom_mae")
    config = json.loads((out / "configs" / "inference.json").read_text())
    assert (config["masking_ratio"], config["norm_pix_loss"], config["roi_size"]) == (0.6, True, [32, 32, 32])
    assert config["network_def"]["_target_"] == "monai_mae.networks.mae.MAEViT"
    readme = (out / "docs" / "README.md").read_text()
    assert "none recorded" in readme and f"no {RUN_SETTINGS_NAME}" in readme and "`masking_ratio` 0.6" in readme
    assert encoder_settings(out / "models" / "model.pt", "vitseg")["hidden_size"] == 24  # fine-tunes as the run's
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        rebuilt = build_network(out / "models" / "model.pt").eval()(x, generator=generator)[0]
        assert torch.equal(rebuilt, mae.eval()(x, generator=torch.Generator().manual_seed(0))[0])


def test_export_refuses_what_it_cannot_write(tmp_path):
    run, _ = _seg_run(tmp_path, "vitseg")
    with pytest.raises(ValueError, match=r"model_best.pt' cannot be written as an nnssl checkpoint: .* needs"):
        export_run(run, tmp_path / "out", format="nnssl")  # a ViTSeg without the Primus-exact options
    with pytest.raises(ValueError, match=r"must be one of \['bundle', 'nnssl'\], got 'onnx'"):
        export_run(run, tmp_path / "out", format="onnx")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match=r"export folder '.*full' exists and is not empty"):
        export_run(run, tmp_path / "full")
    with pytest.raises(FileNotFoundError, match=r"no model file in the run folder '.*empty'"):
        (tmp_path / "empty").mkdir()
        export_run(tmp_path / "empty", tmp_path / "out")
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"'.*plain.pt' does not describe its network"):
        export_run(run, tmp_path / "out", ckpt=tmp_path / "plain.pt")
    assert not (tmp_path / "out").exists()
