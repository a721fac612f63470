"""End-to-end runs of the ``mae_pretrain`` bundle on tiny synthetic data (CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import CPU_ONLY, REPO, TINY_NETWORK, run_bundle, write_overrides
from monai.bundle import ConfigParser

from monai_mae import MAEViT
from monai_mae.data import load_data_preset, write_synthetic_dataset
from monai_mae.model_file import read_model, save_model

pytestmark = pytest.mark.slow  # every test runs the bundle in a subprocess

TINY_RUN = dict(roi_size=[32, 32, 32], patch_size=[8, 8, 8], batch_size=2, num_samples=2, num_workers=0,
                lr=2e-3, warmup_epochs=1, val_interval=1, progress_bar=False, deterministic=True,
                **TINY_NETWORK)  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_synthetic_dataset(root, num=4, num_validation=1, shape=(40, 40, 32), spacing=(1.5, 1.5, 2.0), seed=1)
    return root


def _val_losses(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"Metrics -- val_loss: ([0-9.eE+-]+)", text)]


def test_two_epochs_end_to_end_then_resume(dataset, tmp_path):
    out = tmp_path / "out"
    overrides = write_overrides(tmp_path / "tiny.json", **TINY_RUN)
    first = run_bundle(
        "mae_pretrain",
        "train.json",
        overrides,
        "--dataset_dir",
        str(dataset),
        "--output_dir",
        str(out),
        "--max_epochs",
        "2",
    )
    assert "no checkpoint" in first.stdout and "Epoch[2] Complete" in first.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    state = read_model(out / "models" / "model.pt").state_dict
    assert "patch_embedding.patch_embeddings.weight" in state and "decoder_pred.weight" in state
    assert (out / "models" / "model_best.pt").exists()
    assert (out / "reconstructions" / "epoch_0002.png").exists() and any((out / "tensorboard").iterdir())
    assert len(_val_losses(first.stdout)) == 2

    # the same command with more epochs resumes after epoch 2 instead of starting over
    second = run_bundle(
        "mae_pretrain",
        "train.json",
        overrides,
        "--dataset_dir",
        str(dataset),
        "--output_dir",
        str(out),
        "--max_epochs",
        "3",
    )
    assert "resumed from" in second.stdout and "checkpoint_epoch=2.pt" in second.stdout
    assert "Epoch[1] Complete" not in second.stdout and "Epoch[3] Complete" in second.stdout
    assert (out / "checkpoints" / "checkpoint_epoch=3.pt").exists()

    # inference: one reconstruction per validation volume, in the input's space
    # (the network, crop size, masking and preprocessing come from the model file: no network overrides)
    infer_overrides = write_overrides(tmp_path / "infer.json", num_workers=0)
    infer = run_bundle(
        "mae_pretrain", "inference.json", infer_overrides, "--dataset_dir", str(dataset), "--output_dir", str(out)
    )
    assert infer.returncode == 0
    source = nib.load(dataset / "imagesTr" / "phantom_003.nii.gz")
    recon = nib.load(out / "reconstructions_nifti" / "phantom_003_recon.nii.gz")
    assert recon.shape == source.shape and np.allclose(recon.affine, source.affine)
    data = recon.get_fdata()
    assert np.isfinite(data).all() and -200 < data.mean() < 300  # back in HU, inside the CT window
    # the masked-patch error next to the mean fill's, over the one validation volume (the demo's figure)
    error = json.loads((out / "reconstruction_error.json").read_text())
    assert error["volumes"] == 1 and 0 < error["masked_mse_ratio"] < 10
    assert error["masked_mse_ratio"] == pytest.approx(error["masked_mse"] / error["mean_fill_mse"])
    assert "masked-patch MSE" in infer.stdout + infer.stderr


def test_validation_loss_decreases(dataset, tmp_path):
    overrides = write_overrides(tmp_path / "tiny.json", **TINY_RUN)
    result = run_bundle(
        "mae_pretrain", "train.json", overrides, "--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "out"),
        "--max_epochs", "8", "--resume", "False",
    )  # fmt: skip
    losses = _val_losses(result.stdout)
    assert len(losses) == 8
    assert min(losses[-3:]) < losses[0] * 0.8, losses
    # "best" is the lowest loss in the log (the evaluator's key metric) and in model_best.pt's record
    best_value, best_epoch = re.findall(
        r"Key metric: val_loss best value: ([0-9.eE+-]+) at epoch: (\d+)", result.stdout
    )[-1]
    assert (
        float(best_value) == pytest.approx(min(losses), abs=1e-4) and int(best_epoch) == losses.index(min(losses)) + 1
    )
    record = torch.load(tmp_path / "out" / "checkpoints" / "checkpoint_epoch=8.pt", weights_only=True)["best"]
    assert record["best_epoch"] == int(best_epoch) and record["best"] == pytest.approx(float(best_value))


def test_named_folder_without_datalist_stops_unless_synthetic_data_is_asked_for(tmp_path):
    overrides = write_overrides(tmp_path / "tiny.json", **{**TINY_RUN, "max_epochs": 1, "val_interval": 5})
    empty = tmp_path / "my_ct"
    empty.mkdir()
    args = ("--dataset_dir", str(empty), "--output_dir", str(tmp_path / "out"))
    stopped = run_bundle("mae_pretrain", "train.json", overrides, *args, check=False)
    assert stopped.returncode != 0
    assert f"dataset_dir {str(empty)!r} exists but has no datalist.json" in stopped.stderr
    assert "--synthetic_if_missing True" in stopped.stderr
    assert list(empty.iterdir()) == [] and not (tmp_path / "out" / "models").exists()
    run_bundle("mae_pretrain", "train.json", overrides, *args, "--synthetic_if_missing", "True")
    assert (empty / "datalist.json").exists() and len(list((empty / "imagesTr").iterdir())) == 8


def test_verify_net_in_out(tmp_path):
    """inference.json rebuilds the MAE from the model file it loads: the default ViT-B, written as the bundle writes it."""
    bundle = REPO / "bundles" / "mae_pretrain"
    settings = ConfigParser.load_config_file(str(bundle / "configs" / "train.json"))["network_def"]
    mae = MAEViT(**{k: v for k, v in settings.items() if not k.startswith("_") and not str(v).startswith("@")},
                 img_size=96, patch_size=16)  # fmt: skip
    ckpt = save_model(mae, tmp_path / "model.pt", data_preset={**load_data_preset("ct"), "roi_size": [96, 96, 96]})
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "--net_id", "reconstructor",
           "--meta_file", str(bundle / "configs" / "metadata.json"), "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--ckpt_path", str(ckpt)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **CPU_ONLY})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_2d_slices_train_and_reconstruct(dataset, tmp_path):
    overrides = write_overrides(
        tmp_path / "tiny2d.json",
        **{**TINY_RUN, "spatial_dims": 2, "roi_size": [32, 32], "patch_size": [8, 8], "max_epochs": 1},
    )
    out = tmp_path / "out"
    run_bundle("mae_pretrain", "train.json", overrides, "--dataset_dir", str(dataset), "--output_dir", str(out))
    state = read_model(out / "models" / "model.pt").state_dict
    assert state["patch_embedding.patch_embeddings.weight"].shape == (48, 1, 8, 8)
    assert (
        read_model(out / "models" / "model.pt").data_preset["spatial_dims"] == 2
    )  # inference rebuilds the 2D slicer from it
    infer_overrides = write_overrides(tmp_path / "infer.json", num_workers=0)
    run_bundle(
        "mae_pretrain", "inference.json", infer_overrides, "--dataset_dir", str(dataset), "--output_dir", str(out)
    )
    source = nib.load(dataset / "imagesTr" / "phantom_003.nii.gz")
    recon = nib.load(out / "reconstructions_nifti" / "phantom_003_recon.nii.gz")
    assert recon.shape == source.shape and np.allclose(recon.affine, source.affine)
