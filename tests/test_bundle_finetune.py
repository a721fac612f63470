"""End-to-end runs of the ``mae_finetune`` bundle on tiny synthetic data (CPU): train from an MAE
checkpoint, evaluate, infer, a mismatched checkpoint, and the network's input/output check."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import CPU_ONLY, REPO, run_bundle, write_overrides

from monai_mae import MAEViT
from monai_mae.data import write_synthetic_dataset
from monai_mae.model_file import read_model, save_model

pytestmark = pytest.mark.slow  # every test runs the bundle in a subprocess

NUM_CLASSES = 5
TINY_UNETR = {"architecture": "unetr", "encoder#hidden_size": 48, "encoder#mlp_dim": 96, "encoder#num_heads": 4,
              "unetr#feature_size": 4}  # fmt: skip
TINY_RUN = dict(roi_size=[32, 32, 32], batch_size=1, num_samples=1, num_workers=0, warmup_epochs=1, val_interval=1,
                sw_batch_size=2, progress_bar=False, **TINY_UNETR, deterministic=True)  # fmt: skip
TINY_INFER = dict(num_workers=0, sw_batch_size=2)  # the network and the preprocessing come from the model file
CONFIGS = REPO / "bundles" / "mae_finetune" / "configs"


def _run_layered(configs: list[str], overrides: Path, *args: str) -> subprocess.CompletedProcess:
    """Like ``bundle_utils.run_bundle`` with several bundle configs layered (``train.json`` + ``evaluate.json``)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", str([*(str(CONFIGS / c) for c in configs), str(overrides)]),
           "--bundle_root", str(CONFIGS.parent), "--meta_file", str(CONFIGS / "metadata.json"),
           "--logging_file", str(CONFIGS / "logging.conf"), *args]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **CPU_ONLY}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _tiny_mae(hidden_size: int = 48) -> MAEViT:
    """An MAE whose encoder fits the tiny UNETR (12 layers, patch 16, qkv bias) when ``hidden_size`` is 48."""
    return MAEViT(1, 32, 16, hidden_size=hidden_size, mlp_dim=2 * hidden_size, num_layers=12, num_heads=4, qkv_bias=True,
                  decoder_hidden_size=32, decoder_mlp_dim=64, decoder_num_layers=1, decoder_num_heads=4)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _passive_openmp():
    """Bundle subprocesses run 2 OpenMP threads; on a CPU shared with other jobs, spinning threads
    waiting for a descheduled sibling made them several times slower. Passive waiting avoids that."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_WAIT_POLICY", "PASSIVE")
        yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_synthetic_dataset(root, num=4, num_validation=1, shape=(40, 40, 32), spacing=(1.5, 1.5, 2.0), seed=1)
    return root


@pytest.fixture(scope="module")
def finetuned(dataset, tmp_path_factory):
    """One tiny epoch from an MAE checkpoint with the encoder frozen throughout."""
    tmp = tmp_path_factory.mktemp("finetune")
    mae = _tiny_mae()
    torch.save(mae.state_dict(), tmp / "mae.pt")
    overrides = write_overrides(tmp / "tiny.json", **TINY_RUN, max_epochs=1, freeze_encoder_epochs=1)
    result = run_bundle(
        "mae_finetune", "train.json", overrides, "--dataset_dir", str(dataset), "--output_dir", str(tmp / "out"),
        "--pretrained_ckpt", str(tmp / "mae.pt"),
    )  # fmt: skip
    return tmp / "out", result, mae.state_dict()


def test_finetune_loads_mae_encoder_and_keeps_it_frozen(finetuned):
    out, result, mae_state = finetuned
    assert "MAE encoder transfer: 173 tensors loaded" in result.stdout and "0 missing" in result.stdout
    assert "ViT encoder frozen" in result.stdout and "Epoch[1] Complete" in result.stdout
    assert "val_mean_dice" in result.stdout and "val_dice_organ_4" in result.stdout  # per-class Dice logged
    model = read_model(out / "models" / "model.pt")
    state = model.state_dict
    # self-describing: class, constructor arguments and the data preset used
    assert model.network["_target_"] == "monai.networks.nets.UNETR"
    assert (model.network["hidden_size"], model.network["feature_size"], model.network["out_channels"]) == (
        48,
        4,
        NUM_CLASSES,
    )
    assert model.data_preset["modality"] == "ct" and model.data_preset["roi_size"] == [32, 32, 32]
    assert model.data_preset["a_min"] == -175.0 and model.run["bundle"] == "mae_finetune"
    vit_keys = [k for k in state if k.startswith("vit.")]
    assert len(vit_keys) == 173
    # residual_scale "auto": what writes into the residual stream is scaled by the logged factor
    factor = float(re.search(r"residual stream rescaled by ([0-9.e+-]+)", result.stdout).group(1))
    scaled = re.compile(r"vit\.(patch_embedding\..*|blocks\.\d+\.(attn\.out_proj|mlp\.linear2)\.(weight|bias))$")
    assert sum(bool(scaled.match(k)) for k in vit_keys) == 3 + 12 * 4
    for key in vit_keys:  # loaded, then untouched by the optimizer while frozen
        expected = mae_state[key[len("vit.") :]]
        if scaled.match(key):
            torch.testing.assert_close(state[key], factor * expected, rtol=1e-3, atol=1e-7, msg=key)
        else:
            assert torch.equal(state[key], expected), key
    assert (out / "models" / "model_best.pt").exists() and (out / "checkpoints" / "checkpoint_epoch=1.pt").exists()


def test_evaluate_writes_per_class_dice(finetuned, dataset):
    out, _, _ = finetuned
    overrides = write_overrides(out.parent / "tiny_eval.json", **TINY_RUN)
    result = _run_layered(
        ["train.json", "evaluate.json"], overrides, "--dataset_dir", str(dataset), "--output_dir", str(out)
    )
    assert "Restored all variables from" in result.stdout and "model_best.pt" in result.stdout
    report = json.loads((out / "eval" / "metrics.json").read_text())
    assert report["checkpoint"].endswith("model_best.pt") and report["num_cases"] == 1
    per_class = [report["metrics"][f"val_dice_organ_{i}"] for i in range(1, NUM_CLASSES)]
    assert all(v is None or 0.0 <= v <= 1.0 for v in per_class)
    assert 0.0 <= report["metrics"]["val_mean_dice"] <= 1.0
    assert (out / "eval" / "val_mean_dice_raw.csv").exists()


def test_inference_writes_labels_in_the_input_space(finetuned, dataset, tmp_path):
    out, _, _ = finetuned
    # an input in another orientation (flipped x and y) and spacing than the training data
    source = nib.load(dataset / "imagesTr" / "phantom_003.nii.gz")
    affine = np.diag([-1.0, -1.25, 2.5, 1.0])
    affine[:3, 3] = (20.0, 25.0, -40.0)
    (tmp_path / "images").mkdir()
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[:, :, :27], affine), tmp_path / "images" / "odd.nii.gz")
    (tmp_path / "datalist.json").write_text(json.dumps({"test": [{"image": "images/odd.nii.gz"}]}))
    overrides = write_overrides(tmp_path / "tiny_infer.json", **TINY_INFER)
    run_bundle("mae_finetune", "inference.json", overrides, "--dataset_dir", str(tmp_path), "--datalist_key", "test",
               "--output_dir", str(out))  # fmt: skip
    seg = nib.load(out / "segmentations" / "odd_seg.nii.gz")
    assert seg.shape == (40, 40, 27) and np.allclose(seg.affine, affine)
    labels = np.asarray(seg.dataobj)
    assert labels.dtype == np.uint8 and labels.max() < NUM_CLASSES


def test_mismatched_checkpoint_fails_with_a_clear_error(dataset, tmp_path):
    torch.save(_tiny_mae(hidden_size=96).state_dict(), tmp_path / "wide_mae.pt")
    overrides = write_overrides(tmp_path / "tiny.json", **TINY_RUN, max_epochs=1)
    result = run_bundle(
        "mae_finetune", "train.json", overrides, "--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "out"),
        "--pretrained_ckpt", str(tmp_path / "wide_mae.pt"), check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "wide_mae.pt' does not fit UNETR" in result.stderr
    assert "hidden width differs: checkpoint has hidden_size=96, target has 48" in result.stderr


def test_verify_net_in_out():
    # tiny sizes here; the default ViT-B at 96^3 passes the same check (about 30 s on 2 CPU cores)
    tiny = [arg for key, value in TINY_UNETR.items() for arg in (f"--{key}", str(value))]
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "--net_id", "network_def",
           "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "train.json"),
           "--bundle_root", str(CONFIGS.parent), "--roi_size", "[32, 32, 32]",
           "--_meta_#network_data_format#inputs#image#spatial_shape", "[32, 32, 32]", *tiny]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **CPU_ONLY})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


# ------------------------------------------------------------------- self-describing model files
TINY_VITSEG_RUN = dict(architecture="vitseg", roi_size=[32, 32, 32], batch_size=1, num_samples=1, num_workers=0, warmup_epochs=1, val_interval=1,
                       sw_batch_size=2, progress_bar=False, max_epochs=1, **{"vitseg#decoder_channels": [8, 8, 8]},
                       deterministic=True)  # fmt: skip


@pytest.fixture(scope="module")
def described_mae(tmp_path_factory):
    """A RoPE/SwiGLU MAE saved as the pretraining bundle saves it, with an MRI data preset."""
    path = tmp_path_factory.mktemp("described") / "mae.pt"
    mae = MAEViT(1, 32, 8, hidden_size=24, mlp_dim=48, num_layers=2, num_heads=2, qkv_bias=True, cls_token=False,
                 pos_embed_type="rope", mlp_type="swiglu", layer_scale_init=0.1, decoder_hidden_size=16,
                 decoder_mlp_dim=32, decoder_num_layers=1, decoder_num_heads=2)  # fmt: skip
    preset = {"modality": "mri", "pixdim": [1.0, 1.0, 1.0], "num_samples": 1, "flip_prob": 0.1, "roi_size": [32, 32, 32],
              "spatial_dims": 3, "in_channels": 1, "orientation": "RAS"}  # fmt: skip
    save_model(mae, path, data_preset=preset, run={"bundle": "mae_pretrain"})
    return path, mae


def test_pretrained_ckpt_alone_configures_encoder_and_preprocessing(described_mae, dataset, tmp_path):
    path, mae = described_mae
    overrides = write_overrides(tmp_path / "tiny.json", **TINY_VITSEG_RUN)
    result = run_bundle(
        "mae_finetune", "train.json", overrides, "--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "out"),
        "--pretrained_ckpt", str(path),
    )  # fmt: skip
    assert "0 missing" in result.stdout
    model = read_model(tmp_path / "out" / "models" / "model.pt")
    assert model.network["_target_"] == "monai_mae.networks.vitseg.ViTSeg"
    for key in ("hidden_size", "num_layers", "num_heads", "mlp_dim", "pos_embed_type", "mlp_type", "layer_scale_init"):
        assert model.network[key] == mae.init_args[key], key
    assert model.data_preset["modality"] == "mri" and model.data_preset["pixdim"] == [1.0, 1.0, 1.0]
    # inference needs only the model file and the data: network and preprocessing are rebuilt from it
    infer = write_overrides(tmp_path / "infer.json", **TINY_INFER)
    run_bundle(
        "mae_finetune", "inference.json", infer, "--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "out")
    )
    segmentations = sorted((tmp_path / "out" / "segmentations").glob("*_seg.nii.gz"))
    assert len(segmentations) == 1 and nib.load(segmentations[0]).shape == (40, 40, 32)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("--encoder#hidden_size", "48"),
            r"encoder settings contradict the checkpoint .*hidden_size=48 \(given\) vs hidden_size=24",
        ),
        (("--modality", "ct"), r"data settings contradict the checkpoint .*modality='ct' \(given\) vs modality='mri'"),
        (("--architecture", "unetr"), r"cannot be built as MONAI's UNETR: num_layers=2 \(UNETR has 12\), patch_size=8"),
    ],
)
def test_settings_that_contradict_the_checkpoint_stop_the_run(described_mae, dataset, tmp_path, args, message):
    path, _ = described_mae
    overrides = write_overrides(tmp_path / "tiny.json", **TINY_VITSEG_RUN)
    result = run_bundle(
        "mae_finetune", "train.json", overrides, "--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "out"),
        "--pretrained_ckpt", str(path), *args, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and re.search(message, result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "out" / "models").exists()
