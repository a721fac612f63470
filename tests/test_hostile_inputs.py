"""Hostile inputs: each case is either handled as documented or rejected with an error naming the file.

| input | policy |
|---|---|
| NaN/Inf image voxels | replaced (CT: a_min, MRI: 0), warning naming the file; all NaN: rejected |
| constant ("empty") image | warning; constant crops, finite loss |
| 4D image, singleton 4th axis | read as one channel |
| 4D image, 4th axis != in_channels; 2D, 5D, zero-size | rejected |
| non-finite or singular affine; complex voxels | rejected |
| label NaN, non-integer, negative or >= num_classes; multi-channel label | rejected |
| datalist path outside the dataset folder | rejected by load_datalist |
| one bad file in a bundle run | stops before training (default) or dropped with a warning (skip_bad_files) |
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import TINY_NETWORK, run_bundle, write_overrides

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.data import (
    check_nifti,
    check_volume,
    get_pretrain_transforms,
    load_datalist,
    validate_datalist,
    write_synthetic_dataset,
)

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
SHAPE = (12, 12, 10)
TINY = dict(hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4, decoder_hidden_size=24, decoder_mlp_dim=48,
            decoder_num_layers=1, decoder_num_heads=4)  # fmt: skip


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _ct(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-200, 300, shape).astype(np.float32)


def _with_nan(shape=SHAPE) -> np.ndarray:
    data = _ct(shape)
    data[0, 0, 0], data[1, 2, 3], data[4, 4, 4] = np.nan, np.inf, -np.inf
    return data


def _labels(values, shape=SHAPE, dtype=np.float32) -> np.ndarray:
    data = np.zeros(shape, dtype)
    data.flat[: len(values)] = values
    return data


def _raises(path: Path, match: str):
    return pytest.raises(ValueError, match=re.escape(f"{path}: ") + match)


# ---------------------------------------------------------------------------------------- rejected
@pytest.mark.parametrize(
    "data, kwargs, match",
    [
        (
            np.ones((*SHAPE, 3), np.float32),
            {},
            r"image of shape \(12, 12, 10, 3\) holds 3 channel\(s\) \(the 4th axis of a 4D file\), expected 1 "
            r"\(in_channels=1\)",
        ),
        (
            np.ones((*SHAPE, 1), np.float32),
            {"in_channels": 2},
            r"image of shape \(12, 12, 10, 1\) holds 1 channel\(s\).*expected 2",
        ),
        (np.ones((*SHAPE, 1, 2), np.float32), {}, r"5D image of shape \(12, 12, 10, 1, 2\); expected a 3D volume"),
        (np.ones((12, 12), np.float32), {}, r"2D image of shape \(12, 12\); expected a 3D volume"),
        (np.ones((12, 0, 10), np.float32), {}, r"empty image of shape \(12, 0, 10\)"),
        (np.ones(SHAPE, np.complex64), {}, r"voxel type complex64 is not supported"),
        (np.full(SHAPE, np.nan, np.float32), {}, r"every one of the 1440 voxels is NaN or Inf"),
        (_with_nan(), {"allow_nonfinite": False}, r"1 NaN and 2 Inf voxels of 1440 \(allow_nonfinite=False\)"),
        (
            _labels([0, 1, 2, 5, 3]),
            {"expect_label": True, "num_classes": 3},
            r"label values \[3, 5\] outside 0..2 \(num_classes=3\)",
        ),
        (_labels([1, -1], dtype=np.int16), {"expect_label": True}, r"label values \[-1\] outside >= 0"),
        (
            _labels([1, 0.5, 2.25]),
            {"expect_label": True},
            r"label has 2 non-integer voxel values \(e.g. \[0.5, 2.25\]\)",
        ),
        (_labels([1, np.nan]), {"expect_label": True, "num_classes": 2}, r"label has 1 NaN and 0 Inf voxels"),
        (
            np.zeros((*SHAPE, 2), np.uint8),
            {"expect_label": True},
            r"label of shape .* holds 2 channel\(s\) .*a label map is one channel",
        ),
    ],
    ids=[
        "4d-3-channels",
        "4d-too-few-channels",
        "5d",
        "2d",
        "zero-size",
        "complex",
        "all-nan",
        "nan-strict",
        "label-too-large",
        "label-negative",
        "label-fraction",
        "label-nan",
        "label-2-channels",
    ],  # fmt: skip
)
def test_check_volume_rejects(tmp_path, data, kwargs, match):
    path = _save(tmp_path / "vol.nii.gz", data)
    with _raises(path, match):
        check_volume(path, **kwargs)


def test_scaled_label_with_fractions_is_rejected(tmp_path):
    img = nib.Nifti1Image(_labels([1, 2, 3], dtype=np.int16), AFFINE)
    img.header.set_slope_inter(0.5, 0.0)  # stored integers, but the values are 0.5, 1.0, 1.5
    nib.save(img, tmp_path / "scaled.nii.gz")
    with _raises(tmp_path / "scaled.nii.gz", r"label has 2 non-integer voxel values \(e.g. \[0.5, 1.5\]\)"):
        check_volume(tmp_path / "scaled.nii.gz", expect_label=True)


def _sform(rows):
    def write(path: Path) -> Path:  # written through the header: nibabel refuses to build such an affine itself
        header = nib.Nifti1Header()
        header.set_data_shape(SHAPE)
        header.set_data_dtype(np.float32)
        header["sform_code"] = 1
        header["srow_x"], header["srow_y"], header["srow_z"] = rows
        nib.save(nib.Nifti1Image(_ct(), None, header=header), path)
        return path

    return write


def _pixdim(spacing):
    def write(path: Path) -> Path:
        img = nib.Nifti1Image(_ct(), None)  # no sform/qform: the affine comes from pixdim
        img.header.set_zooms(spacing)
        nib.save(img, path)
        return path

    return write


@pytest.mark.parametrize(
    "write, match",
    [
        (
            _sform([[np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]),
            r"non-finite affine \(NaN/Inf in the voxel-to-world matrix",
        ),
        (_pixdim((1.0, float("nan"), 1.0)), r"non-finite affine"),
        (_sform([[1.5, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0]]), r"singular affine .*zero voxel size"),
    ],
    ids=["nan-sform", "nan-pixdim", "zero-spacing"],
)
def test_check_volume_rejects_bad_affines(tmp_path, write, match):
    path = write(tmp_path / "vol.nii.gz")
    with _raises(path, match):
        check_volume(path)


def test_truncated_inside_the_last_header_offset_is_detected(tmp_path):
    path = _save(tmp_path / "vol.nii", _ct())
    path.write_bytes(path.read_bytes()[:-100])  # 100 bytes short: less than the 352-byte header offset
    with _raises(path, r"corrupt or truncated NIfTI \(voxel data ends at byte"):
        check_nifti(path)
    with _raises(path, r"corrupt or truncated NIfTI"):
        check_volume(path)


def test_datalist_pointing_outside_the_dataset_is_rejected(tmp_path):
    write_synthetic_dataset(tmp_path / "ds", num=2, num_validation=0, shape=SHAPE, num_organs=1)
    outside = _save(tmp_path / "outside.nii.gz", _ct())  # exists
    (tmp_path / "ds" / "datalist.json").write_text(json.dumps({"training": [{"image": "../outside.nii.gz"}]}))
    with pytest.raises(ValueError, match=re.escape(f"= {outside} points outside the dataset folder")):
        load_datalist(tmp_path / "ds")


# ----------------------------------------------------------------------------------------- handled
def test_singleton_4th_axis_is_one_channel(tmp_path):
    path = _save(tmp_path / "vol4d.nii.gz", _ct((*SHAPE, 1)))
    check_volume(path)
    crop = get_pretrain_transforms("ct", roi_size=8, pixdim=None, train=False)({"image": str(path)})["image"]
    assert crop.shape == (1, 8, 8, 8)
    check_volume(_save(tmp_path / "vol3ch.nii.gz", _ct((*SHAPE, 3))), in_channels=3)
    check_volume(
        _save(tmp_path / "lab4d.nii.gz", _labels([1, 2], (*SHAPE, 1), np.uint8)), expect_label=True, num_classes=3
    )


@pytest.mark.parametrize("modality, fill", [("ct", 0.0), ("mri", None)])
def test_nan_voxels_are_replaced_with_a_warning_naming_the_file(tmp_path, caplog, modality, fill):
    path = _save(tmp_path / "nan.nii.gz", _with_nan())
    with caplog.at_level(logging.WARNING):
        check_volume(path)
    assert f"{path}: 1 NaN and 2 Inf voxels of 1440; the preprocessing replaces them" in caplog.text
    caplog.clear()
    transform = get_pretrain_transforms(modality, roi_size=SHAPE, pixdim=None, train=False)
    with caplog.at_level(logging.WARNING):
        image = transform({"image": str(path)})["image"]
    assert f"{path}: 3 NaN/Inf voxel(s) of 1440 in 'image' replaced by {-175 if modality == 'ct' else 0}" in caplog.text
    assert torch.isfinite(image).all()
    if fill is not None:  # CT: the window minimum, i.e. 0 after windowing
        assert float(image[0, 0, 0, 0]) == fill
    raw = get_pretrain_transforms(modality, roi_size=SHAPE, pixdim=None, train=False, replace_nonfinite=False)
    assert not torch.isfinite(raw({"image": str(path)})["image"]).all()  # the opt-out leaves them


@pytest.mark.parametrize("modality", ["ct", "mri"])
@pytest.mark.parametrize("value", [-1000.0, 0.0, 40.0])
def test_constant_volume_warns_and_gives_a_finite_loss(tmp_path, caplog, modality, value):
    path = _save(tmp_path / "flat.nii.gz", np.full((20, 20, 20), value, np.float32))  # larger than the crop
    with caplog.at_level(logging.WARNING):
        check_volume(path)
    assert f"{path}: constant image (every finite voxel = {value:g})" in caplog.text
    crops = get_pretrain_transforms(modality, roi_size=16, num_samples=2, train=True)({"image": str(path)})
    images = torch.stack([c["image"].as_tensor() for c in crops])
    assert images.shape == (2, 1, 16, 16, 16) and images.min() == images.max()
    net = MAEViT(1, 16, 8, **TINY)
    for norm_pix_loss in (False, True):
        loss = MaskedReconstructionLoss(8, norm_pix_loss=norm_pix_loss)(net(images), images)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_valid_labels_pass(tmp_path):
    check_volume(_save(tmp_path / "l.nii.gz", _labels([0, 1, 2], dtype=np.uint8)), expect_label=True, num_classes=3)
    check_volume(_save(tmp_path / "f.nii.gz", _labels([0.0, 1.0, 2.0])), expect_label=True)


def test_bad_arguments(tmp_path):
    path = _save(tmp_path / "v.nii.gz", _ct())
    with pytest.raises(ValueError, match="num_classes must be an int >= 1 or None, got 0"):
        check_volume(path, expect_label=True, num_classes=0)
    with pytest.raises(ValueError, match="in_channels must be an int >= 1, got 0"):
        check_volume(path, in_channels=0)


# ------------------------------------------------------------------------------- validate_datalist
@pytest.fixture
def dataset(tmp_path) -> Path:
    write_synthetic_dataset(tmp_path / "ds", num=4, num_validation=0, shape=SHAPE, num_organs=2)
    return tmp_path / "ds"


def test_validate_datalist_stops_on_a_bad_file_or_skips_it(dataset, caplog):
    items = load_datalist(dataset, require_label=True)
    bad = _save(Path(items[2]["image"]), _ct((*SHAPE, 3)))
    with pytest.raises(
        ValueError, match=rf"datalist entry 2 \['image'\]: {re.escape(str(bad))}: image of shape .* holds 3 channel"
    ) as err:
        validate_datalist(items, ("image", "label"), num_classes=3)
    assert "skip_bad_files" in str(err.value)
    with caplog.at_level(logging.WARNING):
        kept = validate_datalist(items, ("image", "label"), num_classes=3, skip_bad_files=True)
    assert kept == [items[0], items[1], items[3]]
    assert f"skipping datalist entry 2 (skip_bad_files): datalist entry 2 ['image']: {bad}" in caplog.text


def test_validate_datalist_lists_every_problem(dataset):
    items = load_datalist(dataset, require_label=True)
    _save(Path(items[0]["label"]), _labels([7], dtype=np.uint8))
    _save(Path(items[3]["image"]), np.full(SHAPE, np.nan, np.float32))
    with pytest.raises(ValueError, match=r"2 of 4 datalist entries failed the checks") as err:
        validate_datalist(items, ("image", "label"), num_classes=3)
    assert f"datalist entry 0 ['label']: {items[0]['label']}: label values [7] outside 0..2" in str(err.value)
    assert f"datalist entry 3 ['image']: {items[3]['image']}: every one of" in str(err.value)
    with pytest.raises(ValueError, match="every one of the 4 datalist entries failed"):
        validate_datalist(items, ("image", "label"), num_classes=1, skip_bad_files=True)


def test_validate_datalist_checks_shapes_and_channels_of_an_entry(dataset):
    items = load_datalist(dataset, require_label=True)
    _save(Path(items[1]["label"]), _labels([1], (12, 12, 8), np.uint8))
    with pytest.raises(
        ValueError, match=r"datalist entry 1: the volumes of one entry differ in spatial shape .*\(12, 12, 8\)"
    ):
        validate_datalist(items, ("image", "label"))
    two = [{"image": [items[0]["image"], items[2]["image"]]}]
    with pytest.raises(ValueError, match=r"datalist entry 0 \['image'\]: 2 files cannot hold 1 channel\(s\)"):
        validate_datalist(two)
    assert validate_datalist(two, in_channels=2) == two


# ------------------------------------------------------------------------------------- bundle runs
TINY_RUN = dict(roi_size=[32, 32, 32], patch_size=[8, 8, 8], batch_size=2, num_samples=1, num_workers=0,
                lr=2e-3, warmup_epochs=1, val_interval=1, progress_bar=False, max_epochs=1, **TINY_NETWORK)  # fmt: skip


@pytest.mark.slow
def test_bundle_stops_before_training_or_skips_the_bad_file(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, num=4, num_validation=1, shape=(40, 40, 32), seed=4)
    items = load_datalist(data)
    bad = Path(items[1]["image"])
    _save(bad, np.zeros((40, 40, 32, 3), np.int16))  # 3 channels for a 1-channel network
    nan_image = Path(items[2]["image"])
    volume = nib.load(nan_image)
    values = volume.get_fdata().astype(np.float32)
    values[10:12, 10:12, 10:12] = np.nan
    _save(nan_image, values, volume.affine)

    overrides = write_overrides(tmp_path / "tiny.json", **TINY_RUN)
    args = ("--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"))
    stopped = run_bundle("mae_pretrain", "train.json", overrides, *args, check=False)
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0
    assert f"datalist entry 1 ['image']: {bad}: image of shape (40, 40, 32, 3) holds 3 channel(s)" in log
    assert "Epoch[1]" not in log and not (tmp_path / "out" / "checkpoints").exists()

    skipping = write_overrides(tmp_path / "skip.json", **TINY_RUN, skip_bad_files=True)
    result = run_bundle("mae_pretrain", "train.json", skipping, *args)
    assert f"skipping datalist entry 1 (skip_bad_files): datalist entry 1 ['image']: {bad}" in result.stdout
    assert f"{nan_image}: 8 NaN/Inf voxel(s) of" in result.stdout  # replaced, with a warning naming the file
    assert "Epoch[1] Complete" in result.stdout and (tmp_path / "out" / "models" / "model.pt").exists()
    shutil.rmtree(tmp_path / "out")
