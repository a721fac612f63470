"""The ``monai-mae`` command: parser, the bundle call it makes (``--dry-run``), errors, and one tiny subprocess
chain synth -> pretrain -> finetune -> export -> the exported bundle's inference (marked slow)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundle_utils import REPO, TINY_NETWORK
from monai.bundle import run as bundle_run

from monai_mae import MAEViT, cli
from monai_mae.data import load_data_preset, write_synthetic_dataset
from monai_mae.export import RUN_SETTINGS_NAME
from monai_mae.model_file import build_network, read_model, save_model
from monai_mae.networks.patching import patchify
from monai_mae.networks.presets import mae_vit
from monai_mae.networks.vitseg import ViTSeg
from monai_mae.packaged import BUNDLE_NAMES, bundle_dir, bundle_file, bundles_root

PRESET = {**load_data_preset("ct"), "roi_size": [16, 16, 16], "spatial_dims": 3, "in_channels": 1}


def _dry(capsys, *argv: str) -> list[str]:
    """The ``python -m monai.bundle run`` words that ``monai-mae ARGV --dry-run`` prints."""
    assert cli.main([*argv, "--dry-run"]) == 0
    return shlex.split(capsys.readouterr().out)


def _opt(words: list[str], key: str) -> str:
    return words[words.index(f"--{key}") + 1]


def _fails(capsys, *argv: str) -> str:
    """stderr of a ``monai-mae`` call that must stop with exit status 2."""
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "text, value",
    [
        ("16", 16),
        ("1e-3", 1e-3),
        ("[16, 16, 16]", [16, 16, 16]),
        ("true", True),
        ("False", False),
        ("null", None),
        ("(1, 2)", (1, 2)),
        ("cpu", "cpu"),
        ("cuda:1", "cuda:1"),
        ("$@lr * 2", "$@lr * 2"),
        ('{"a": 1}', {"a": 1}),
    ],
)
def test_values_read_as_json_then_python_literal_then_string(text, value):
    assert cli.parse_value(text) == value and type(cli.parse_value(text)) is type(value)


def test_the_bundles_are_found_in_the_checkout_and_every_subcommand_exists():
    assert bundles_root() == REPO / "bundles"  # a checkout on PYTHONPATH (the wheel: monai_mae/bundles)
    assert [bundle_dir(name).name for name in BUNDLE_NAMES] == ["mae_pretrain", "mae_finetune"]
    assert bundle_file("mae_finetune", "configs/evaluate.json").is_file()
    with pytest.raises(ValueError, match="unknown bundle 'mae_other'"):
        bundle_dir("mae_other")
    with pytest.raises(FileNotFoundError, match="bundle mae_pretrain has no file configs/evaluate.json"):
        bundle_file("mae_pretrain", "configs/evaluate.json")
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert list(commands) == ["synth", "preprocess", "pretrain", "finetune", "evaluate", "infer", "export"]


def test_pretrain_flags_map_to_bundle_settings(capsys, tmp_path):
    argv = ["pretrain", "--data", "data", "--out", "runs/mae", "--device", "cpu", "--epochs", "3", "--modality", "mri"]
    words = _dry(capsys, *argv, "--set", "network_def#hidden_size=48", "--roi_size", "[16, 16, 16]", "--amp=False")
    assert words[:4] == ["python", "-m", "monai.bundle", "run"]
    assert json.loads(_opt(words, "config_file")) == [str(REPO / "bundles" / "mae_pretrain" / "configs" / "train.json")]
    assert _opt(words, "bundle_root") == str(REPO / "bundles" / "mae_pretrain")
    assert _opt(words, "meta_file").endswith("mae_pretrain/configs/metadata.json")
    assert _opt(words, "dataset_dir") == os.path.abspath("data")
    assert _opt(words, "output_dir") == os.path.abspath("runs/mae")
    keys = ("device", "max_epochs", "modality", "network_def#hidden_size", "roi_size", "amp")
    assert [_opt(words, k) for k in keys] == ["cpu", "3", "mri", "48", "[16, 16, 16]", "False"]
    assert "--pretrained_ckpt" not in words and "--preprocessed_dir" not in words  # flags not given are not passed


def test_settings_are_layered_config_files_then_flags_then_set_then_trailing(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"max_epochs": 7, "lr": 0.1}))
    second.write_text(json.dumps({"lr": 0.2}))
    parser = cli.build_parser()
    argv = [
        "finetune",
        "--data",
        "d",
        "--out",
        "o",
        "--config",
        str(first),
        "--config",
        str(second),
        "--epochs",
        "3",
        "--pretrained",
        "mae.pt",
        "--multi-gpu",
        "--set",
        "max_epochs=4",
        "--set",
        "seed=1",
    ]
    args, extra = parser.parse_known_args([*argv, "--max_epochs", "5"])
    call = cli.bundle_call(args, extra)
    configs = bundle_dir("mae_finetune") / "configs"
    bundle_files = [str(configs / "train.json"), str(configs / "multi_gpu_train.json")]
    assert call.config_files == [*bundle_files, str(first), str(second)]
    assert call.settings["max_epochs"] == 5 and call.settings["seed"] == 1  # trailing beats --set beats --epochs
    assert call.settings["pretrained_ckpt"] == os.path.abspath("mae.pt") and "lr" not in call.settings  # lr: the files'
    args, extra = parser.parse_known_args(argv)
    assert cli.bundle_call(args, extra).settings["max_epochs"] == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "novalue"], r"--set takes KEY=VALUE \(e.g. --set network_def#hidden_size=384\), got 'novalue'"),
        (["--max_epochs"], r"the bundle setting --max_epochs needs a value"),
        (["--lr", "--seed", "1"], r"the bundle setting --lr needs a value"),
        (["stray"], r"unexpected argument 'stray': bundle settings go as --KEY VALUE"),
        (["--config", "missing.json"], r"--config file not found: 'missing.json'"),
    ],
)
def test_malformed_settings_stop_with_their_name(capsys, argv, message):
    err = _fails(capsys, "pretrain", "--data", "d", "--out", "o", *argv, "--dry-run")
    assert re.search(rf"monai-mae pretrain: error: {message}", err), err


def test_required_flags_and_unknown_commands_are_argparse_errors(capsys):
    assert "the following arguments are required: --data, --out" in _fails(capsys, "pretrain")
    assert "invalid choice: 'train'" in _fails(capsys, "train")
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"monai-mae {cli.__version__}"


@pytest.fixture
def runs(tmp_path):
    """A pretraining and a fine-tuning run folder with tiny self-describing model files."""
    mae = MAEViT(
        1,
        16,
        8,
        hidden_size=24,
        mlp_dim=48,
        num_layers=1,
        num_heads=2,
        decoder_hidden_size=16,
        decoder_mlp_dim=32,
        decoder_num_layers=1,
        decoder_num_heads=2,
    )
    seg = ViTSeg(1, 3, 16, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2, decoder_channels=[8, 8, 8])
    save_model(mae, tmp_path / "mae" / "models" / "model.pt", data_preset=PRESET, run={"bundle": "mae_pretrain"})
    preset = {**PRESET, "num_classes": 3, "class_names": ["a", "b"]}
    save_model(seg, tmp_path / "seg" / "models" / "model.pt", data_preset=preset, run={"bundle": "mae_finetune"})
    save_model(seg, tmp_path / "seg" / "models" / "model_best.pt", data_preset=preset, run={"bundle": "mae_finetune"})
    return tmp_path


def test_evaluate_and_infer_take_the_run_s_model_and_its_bundle(capsys, runs):
    words = _dry(capsys, "infer", "--data", "d", "--out", str(runs / "mae"))
    assert json.loads(_opt(words, "config_file"))[0].endswith("mae_pretrain/configs/inference.json")
    assert _opt(words, "ckpt_path") == str(runs / "mae" / "models" / "model.pt")
    words = _dry(capsys, "infer", "--data", "d", "--out", str(runs / "seg"))
    assert json.loads(_opt(words, "config_file"))[0].endswith("mae_finetune/configs/inference.json")
    assert _opt(words, "ckpt_path") == str(runs / "seg" / "models" / "model_best.pt")  # the best, as inference.json
    final = str(runs / "seg" / "models" / "model.pt")
    words = _dry(capsys, "evaluate", "--data", "d", "--out", str(runs / "seg"), "--ckpt", final)
    assert [Path(p).name for p in json.loads(_opt(words, "config_file"))] == ["train.json", "evaluate.json"]
    assert _opt(words, "ckpt_path") == final
    err = _fails(capsys, "evaluate", "--data", "d", "--out", str(runs / "none"), "--dry-run")
    assert "no model file in the run folder" in err and "model_best.pt" in err


@pytest.mark.parametrize(
    "setting, value, recorded",
    [("num_classes", "5", "3"), ("spatial_dims", "2", "3"), ("class_names", '["x", "y"]', "['a', 'b']")],
)
def test_a_setting_the_model_file_decides_is_checked_against_it(capsys, runs, setting, value, recorded):
    for command in ("evaluate", "infer"):
        err = _fails(capsys, command, "--data", "d", "--out", str(runs / "seg"), f"--{setting}", value, "--dry-run")
        assert f"{setting}={cli.parse_value(value)!r} (given) vs {setting}={recorded} (in '" in err
        assert "the model file decides" in err
    _dry(capsys, "infer", "--data", "d", "--out", str(runs / "seg"), "--num_classes", "3")  # equal: accepted


@pytest.fixture
def quiet_bundle_run(monkeypatch):
    """Run the bundle in-process without applying its logging.conf to the test process."""
    calls = []

    def run(**kwargs):
        calls.append(kwargs)
        bundle_run(**{**kwargs, "logging_file": False})

    monkeypatch.setattr(cli, "bundle_run", run)
    return calls


def test_a_network_setting_passed_to_infer_is_checked_against_the_model_file(capsys, runs, quiet_bundle_run):
    data = runs / "data"
    write_synthetic_dataset(data, num=2, num_validation=1, shape=(16, 16, 16), num_organs=2)
    base = ["infer", "--data", str(data), "--out", str(runs / "mae"), "--device", "cpu", "--num_workers", "0"]
    assert cli.main([*base, "--network_def#hidden_size", "192"]) == 2
    err = capsys.readouterr().err
    assert "monai-mae infer: error: network settings contradict the checkpoint" in err
    assert "hidden_size=192 (given) vs hidden_size=24" in err and "invalid literal" not in err
    assert cli.main([*base, "--network_def#hidden_size", "24"]) == 0  # the recorded value: runs
    assert len(list((runs / "mae" / "reconstructions_nifti").glob("*_recon.nii.gz"))) == 1


def test_a_run_records_its_command_and_settings(capsys, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "bundle_run", lambda **kwargs: calls.append(kwargs))
    extra = tmp_path / "tiny.json"
    extra.write_text(json.dumps({"max_epochs": 9, "lr": 0.5}))
    argv = ["pretrain", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--config", str(extra)]
    argv += ["--epochs", "2"]
    assert cli.main(argv) == 0
    assert calls[0]["config_file"][-1] == str(extra) and calls[0]["max_epochs"] == 2 and "lr" not in calls[0]
    recorded = json.loads((tmp_path / "run" / RUN_SETTINGS_NAME).read_text())
    assert recorded["command"] == shlex.join(["monai-mae", *argv]) and recorded["bundle"] == "mae_pretrain"
    assert recorded["config_files"] == ["train.json", str(extra)]
    assert recorded["settings"]["lr"] == 0.5 and recorded["settings"]["max_epochs"] == 2  # the file's, then the flags'
    assert recorded["settings"]["dataset_dir"] == str(tmp_path / "d") and recorded["monai_mae"] == cli.__version__


def test_synth_and_preprocess_are_the_package_s_own_command_lines(capsys, tmp_path):
    argv = ["synth", str(tmp_path / "data"), "--num", "2", "--num-validation", "1", "--shape", "16", "16", "12"]
    assert cli.main(argv) == 0
    datalist = json.loads((tmp_path / "data" / "datalist.json").read_text())
    assert (len(datalist["training"]), len(datalist["validation"])) == (1, 1)
    assert capsys.readouterr().out.startswith("wrote 2 synthetic cases")
    for command in ("synth", "preprocess"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "-h"])
        assert info.value.code == 0 and capsys.readouterr().out.startswith(f"usage: monai-mae {command} ")


def test_export_format_and_arguments(capsys, runs):
    err = _fails(capsys, "export", str(runs / "seg"), str(runs / "out"), "--format", "nnssl")
    assert "monai-mae export: error: '" in err and "model_best.pt' cannot be written as an nnssl checkpoint" in err
    err = _fails(capsys, "export", str(runs / "seg"), str(runs / "out"), "--format", "onnx")
    assert "export format must be one of ['bundle', 'nnssl'], got 'onnx'" in err
    err = _fails(capsys, "export", str(runs / "seg"), str(runs / "out"), "--bogus", "1")
    assert "unrecognized arguments: --bogus 1" in err
    assert cli.main(["export", str(runs / "seg"), str(runs / "out"), "--name", "tiny_seg"]) == 0
    assert json.loads((runs / "out" / "configs" / "metadata.json").read_text())["name"] == "tiny_seg"


def _run(*argv: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_synth_pretrain_finetune_export_then_the_bundle_runs_on_its_own(tmp_path):
    """The commands the wheel smoke test runs, from a folder outside the repository, on tiny settings."""
    pre = tmp_path / "pre.json"
    pre.write_text(
        json.dumps(
            {
                "roi_size": [16, 16, 16],
                "patch_size": [8, 8, 8],
                "batch_size": 1,
                "num_samples": 1,
                "num_workers": 0,
                "warmup_epochs": 1,
                "val_interval": 1,
                **TINY_NETWORK,
            }
        )
    )
    ft = tmp_path / "ft.json"
    ft.write_text(
        json.dumps(
            {
                "roi_size": [16, 16, 16],
                "batch_size": 1,
                "num_samples": 1,
                "num_workers": 0,
                "warmup_epochs": 1,
                "val_interval": 1,
                "sw_batch_size": 1,
                "vitseg#decoder_channels": [8, 8, 8],
            }
        )
    )
    synth = ["synth", "data", "--num", "3", "--num-validation", "1", "--shape", "24", "24", "16"]
    _run("-m", "monai_mae", *synth, cwd=tmp_path)
    log = _run(
        "-m",
        "monai_mae",
        "pretrain",
        "--data",
        "data",
        "--out",
        "mae",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--config",
        str(pre),
        cwd=tmp_path,
    ).stdout
    assert "Iter: 1/2 -- train_loss" not in log  # the progress bar is on: no per-iteration log line
    _run(
        "-m",
        "monai_mae",
        "finetune",
        "--data",
        "data",
        "--out",
        "seg",
        "--pretrained",
        "mae/models/model.pt",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--config",
        str(ft),
        cwd=tmp_path,
    )
    model = read_model(tmp_path / "seg" / "models" / "model.pt")
    assert model.network["hidden_size"] == TINY_NETWORK["network_def#hidden_size"]  # the encoder came from the MAE
    _run("-m", "monai_mae", "export", "seg", "shared/seg_bundle", cwd=tmp_path)
    bundle = tmp_path / "shared" / "seg_bundle"
    _run(
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--meta_file",
        "configs/metadata.json",
        "--logging_file",
        "configs/logging.conf",
        "--bundle_root",
        ".",
        "--dataset_dir",
        str(tmp_path / "data"),
        "--output_dir",
        str(tmp_path / "seg_out"),
        "--device",
        "cpu",
        "--num_workers",
        "0",
        cwd=bundle,
    )
    (segmentation,) = (tmp_path / "seg_out" / "segmentations").glob("*_seg.nii.gz")
    assert segmentation.name == "phantom_002_seg.nii.gz"
    assert torch.equal(
        read_model(bundle / "models" / "model.pt").state_dict["norm.weight"],
        read_model(tmp_path / "seg" / "models" / "model_best.pt").state_dict["norm.weight"],
    )


def test_export_nnssl_writes_a_checkpoint_that_reads_back(capsys, tmp_path):
    mae = mae_vit("primus_s", img_size=16, patch_size=8, num_layers=1).eval()
    preset = {"modality": "mri", "pixdim": [1.0, 1.0, 1.0], "roi_size": [16, 16, 16]}
    save_model(mae, tmp_path / "run" / "models" / "model.pt", data_preset=preset, run={"bundle": "mae_pretrain"})
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "nnssl"]) == 0
    assert "wrote the nnssl checkpoint" in capsys.readouterr().out
    plan = json.loads((tmp_path / "out" / "adaptation_plan.json").read_text())
    assert plan["architecture_plans"]["arch_class_name"] == "PrimusS" and plan["trainer_name"] == "monai_mae"
    model = read_model(tmp_path / "out" / "checkpoint_final.pth")  # an nnssl file reads as a model file
    assert model.data_preset["pixdim"] == [1.0, 1.0, 1.0] and model.network["num_heads"] == 6
    encoder = build_network(model).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    patches = patchify(x, (8, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.encode_patches(patches, (2, 2, 2)), mae.forward_encoder(x), atol=1e-5, rtol=0
        )
