"""``mae_finetune`` from an nnssl ``checkpoint_final.pth`` alone: network and preprocessing come from the file, and
its inference segments in the input's space."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import run_bundle, write_overrides

from monai_mae.data import write_synthetic_dataset
from monai_mae.model_file import read_model
from monai_mae.networks.nnssl import nnssl_checkpoint
from monai_mae.networks.presets import mae_vit

pytestmark = pytest.mark.slow  # runs the bundle in a subprocess

TINY_RUN = dict(
    roi_size=[32, 32, 32],
    batch_size=1,
    num_samples=1,
    num_workers=0,
    warmup_epochs=1,
    val_interval=1,
    sw_batch_size=2,
    progress_bar=False,
    max_epochs=1,
    deterministic=True,
    **{"vitseg#decoder_channels": [8, 8, 8]},
)


def test_finetune_from_an_nnssl_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    write_synthetic_dataset(tmp_path / "data", num=2, num_validation=1, shape=(40, 40, 32), spacing=(1.5, 1.5, 2.0))
    torch.manual_seed(0)
    mae = mae_vit("primus_s", img_size=32, patch_size=8, num_layers=1)
    checkpoint = nnssl_checkpoint(mae, {"modality": "mri", "pixdim": [1.5, 1.5, 2.0], "roi_size": [32, 32, 32]})
    # as nnssl's EvaMAE trainer saves it: its trainer name tells the (h w d) token order
    checkpoint["trainer_name"] = "BaseEvaMAETrainer"
    del checkpoint["token_order"]
    torch.save(checkpoint, tmp_path / "checkpoint_final.pth")
    overrides = write_overrides(tmp_path / "tiny.json", **TINY_RUN)
    result = run_bundle(
        "mae_finetune",
        "train.json",
        overrides,
        "--dataset_dir",
        str(tmp_path / "data"),
        "--output_dir",
        str(tmp_path / "out"),
        "--pretrained_ckpt",
        str(tmp_path / "checkpoint_final.pth"),
    )
    assert "0 missing" in result.stdout
    model = read_model(tmp_path / "out" / "models" / "model.pt")
    assert model.network["_target_"] == "monai_mae.networks.vitseg.ViTSeg"
    expected = dict(
        hidden_size=396,
        num_layers=1,
        num_heads=6,
        mlp_dim=1056,
        patch_size=[8, 8, 8],
        qkv_bias="qv",
        rope_theta=10000.0,
        attn_norm=True,
        mlp_norm=True,
        abs_pos_embed=True,
    )
    assert {k: model.network[k] for k in expected} == expected
    assert model.data_preset["modality"] == "mri" and model.data_preset["pixdim"] == [1.5, 1.5, 2.0]
    # inference from the fine-tuned run alone: the network and the preset come from its model file
    run_bundle(
        "mae_finetune",
        "inference.json",
        write_overrides(tmp_path / "infer.json", num_workers=0, sw_batch_size=2),
        "--dataset_dir",
        str(tmp_path / "data"),
        "--output_dir",
        str(tmp_path / "out"),
    )
    source = nib.load(tmp_path / "data" / "imagesTr" / "phantom_001.nii.gz")
    seg = nib.load(tmp_path / "out" / "segmentations" / "phantom_001_seg.nii.gz")
    assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
