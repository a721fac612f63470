"""The masked-image path through both bundles (CPU, tiny): ``mae_pretrain`` with ``configs/mim_cnn.json`` pretrains a
UNet, ``mae_finetune --pretrained_ckpt`` alone builds and starts the same UNet, inference writes segmentations, and
settings that contradict the file stop the run."""

from __future__ import annotations

import json
import re

import nibabel as nib
import pytest
from bundle_utils import run_bundle, write_overrides

from monai_mae.data import write_synthetic_dataset
from monai_mae.model_file import read_model

pytestmark = pytest.mark.slow  # every test runs a bundle in a subprocess

TINY = dict(roi_size=[32, 32, 32], batch_size=1, num_samples=1, num_workers=0, warmup_epochs=1, val_interval=1,
            max_epochs=1, progress_bar=False)  # fmt: skip
TINY_UNET = {"channels": [4, 8], "strides": [2], "num_res_units": 1}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mim")
    write_synthetic_dataset(root / "data", num=4, num_validation=1, shape=(40, 40, 32), spacing=(1.5, 1.5, 2.0), seed=1)
    overrides = write_overrides(root / "tiny.json", **TINY, network_options=TINY_UNET)
    run_bundle("mae_pretrain", ["train.json", "mim_cnn.json"], overrides, "--dataset_dir", str(root / "data"),
               "--output_dir", str(root / "pre"))  # fmt: skip
    return root


def test_pretraining_writes_a_described_masked_image_model(pretrained):
    model = read_model(pretrained / "pre" / "models" / "model.pt")
    assert model.network["_target_"] == "monai_mae.networks.mim.MaskedImageModel"
    assert model.network["architecture"] == "unet" and model.network["patch_size"] == [8, 8, 8]
    assert model.network["options"]["channels"] == [4, 8]
    assert any(k.startswith("network.model.0.") for k in model.state_dict)
    assert (pretrained / "pre" / "reconstructions" / "latest.png").is_file()


def test_reconstruction_error_of_a_masked_image_model(pretrained, tmp_path):
    """inference.json of mae_pretrain rebuilds the masked-image model and reports its masked-patch error."""
    infer = write_overrides(tmp_path / "infer.json", num_workers=0)
    run_bundle("mae_pretrain", "inference.json", infer, "--dataset_dir", str(pretrained / "data"),
               "--output_dir", str(pretrained / "pre"))  # fmt: skip
    error = json.loads((pretrained / "pre" / "reconstruction_error.json").read_text())
    assert error["volumes"] == 1 and 0 < error["masked_mse_ratio"] < 10
    assert len(list((pretrained / "pre" / "reconstructions_nifti").glob("*_recon.nii.gz"))) == 1


def test_pretrained_ckpt_alone_configures_the_cnn(pretrained, tmp_path):
    overrides = write_overrides(tmp_path / "ft.json", **TINY, sw_batch_size=2)
    ckpt = str(pretrained / "pre" / "models" / "model.pt")
    result = run_bundle("mae_finetune", "train.json", overrides, "--dataset_dir", str(pretrained / "data"),
                        "--output_dir", str(tmp_path / "ft"), "--pretrained_ckpt", ckpt)  # fmt: skip
    assert re.search(r"load_pretrained: 11 tensors of UNet loaded from .*\(masked-image pretraining\)", result.stdout)
    model = read_model(tmp_path / "ft" / "models" / "model.pt")
    assert model.network["_target_"] == "monai.networks.nets.UNet"
    assert model.network["channels"] == [4, 8] and model.network["out_channels"] == 5
    infer = write_overrides(tmp_path / "infer.json", num_workers=0, sw_batch_size=2)
    run_bundle("mae_finetune", "inference.json", infer, "--dataset_dir", str(pretrained / "data"),
               "--output_dir", str(tmp_path / "ft"))  # fmt: skip
    (segmentation,) = sorted((tmp_path / "ft" / "segmentations").glob("*_seg.nii.gz"))
    assert nib.load(segmentation).shape == (40, 40, 32)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--architecture", "segresnet"), r"architecture='segresnet' differs from the network pretrained"),
        (("--unet#channels", "[8, 16]"), r"channels=\[8, 16\] \(given\) vs \[4, 8\]"),
    ],
)
def test_settings_that_contradict_the_pretrained_cnn_stop_the_run(pretrained, tmp_path, args, message):
    overrides = write_overrides(tmp_path / "ft.json", **TINY)
    result = run_bundle("mae_finetune", "train.json", overrides, "--dataset_dir", str(pretrained / "data"),
                        "--output_dir", str(tmp_path / "ft"), "--pretrained_ckpt",
                        str(pretrained / "pre" / "models" / "model.pt"), *args, check=False)  # fmt: skip
    assert result.returncode != 0 and re.search(message, result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "ft" / "models").exists()
