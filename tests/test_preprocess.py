"""Preprocess once (monai_mae.data.preprocess): stored volumes equal the in-memory MONAI chain, resume after
damage or a kill, manifest checks, bad inputs, the CLI, crops read through memory maps, 2D slices, crops in the
storage layout converted back, gpu_augment. The manifest's journal, a folder of the first format and the lock:
test_preprocess_manifest.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.transforms import Compose, RandFlipd, RandScaleIntensityd, SpatialPad

from monai_mae.data import (
    PreprocessedCropDataset,
    check_manifest,
    class_names,
    crops,
    declared_classes,
    from_storage_layout,
    get_deterministic_transforms,
    get_pretrain_transforms,
    gpu_augment,
    load_checked_datalist,
    load_data_preset,
    make_phantom,
    num_classes_for,
    preprocess_dataset,
    read_manifest,
    write_synthetic_dataset,
)
from monai_mae.data import datalist as datalist_module
from monai_mae.data import preprocess as pre
from monai_mae.data.preprocess import checks
from monai_mae.engines import MAEPrepareBatch

ROOT = Path(__file__).resolve().parents[1]
F16_ERROR = 2.0**-11  # relative rounding error of float16 (half its 2^-10 relative spacing at the bottom of a binade)


def _save(array: np.ndarray, affine: np.ndarray, path: Path, dtype=None) -> None:
    img = nib.Nifti1Image(array, affine)
    if dtype is not None:
        img.set_data_dtype(dtype)  # float data written as int16: nibabel picks scl_slope/scl_inter
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _datalist(folder: Path, training: list[dict], validation: list[dict] | None = None) -> None:
    data = {"training": training, **({"validation": validation} if validation else {})}
    (folder / "datalist.json").write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Four phantoms 40 x 40 x 32 (three training, one validation) with labels, RAS, 1.5 x 1.5 x 2 mm."""
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(folder, num=4, num_validation=1, shape=(40, 40, 32), num_organs=3)
    return folder


@pytest.fixture(scope="module")
def scanner(tmp_path_factory) -> Path:
    """Scanner-like CT headers: an LPS affine with int16 voxels and a scl_slope (thick slices, fewer than the crop
    needs along z), and an anisotropic RAS volume; both with labels."""
    folder = tmp_path_factory.mktemp("scanner")
    image, label = make_phantom((40, 36, 12), seed=3, num_organs=2)
    lps = np.diag([-0.9, -0.9, 3.0, 1.0])
    lps[:3, 3] = [18.0, 16.0, -15.0]
    _save(image + 0.3, lps, folder / "img" / "lps_slope.nii.gz", dtype=np.int16)
    _save(label, lps, folder / "lab" / "lps_slope.nii.gz")
    image, label = make_phantom((44, 40, 14), seed=4, num_organs=2)
    aniso = np.diag([0.7, 0.8, 2.5, 1.0])
    _save(np.round(image).astype(np.int16), aniso, folder / "img" / "aniso.nii.gz")
    _save(label, aniso, folder / "lab" / "aniso.nii.gz")
    _datalist(
        folder,
        [{"image": "img/lps_slope.nii.gz", "label": "lab/lps_slope.nii.gz"}],
        [{"image": "img/aniso.nii.gz", "label": "lab/aniso.nii.gz"}],
    )
    return folder


@pytest.fixture(scope="module")
def mri(tmp_path_factory) -> Path:
    """Two MRI-like volumes: positive float32 tissue on a zero background, 1.2 x 1.2 x 1.5 mm, no labels."""
    folder = tmp_path_factory.mktemp("mri")
    entries = []
    for i in range(2):
        image, _ = make_phantom((32, 30, 20), seed=10 + i, num_organs=2)
        signal_ = np.where(image > -500, (image + 1000.0) * 0.4, 0.0).astype(np.float32)
        _save(signal_, np.diag([1.2, 1.2, 1.5, 1.0]), folder / "img" / f"mri_{i}.nii.gz")
        entries.append({"image": f"img/mri_{i}.nii.gz"})
    _datalist(folder, entries)
    return folder


@pytest.fixture(scope="module")
def ct_out(synthetic, tmp_path_factory) -> Path:
    """The synthetic phantoms preprocessed once with the packaged CT preset (read-only for the tests using it)."""
    out = tmp_path_factory.mktemp("ct_out") / "pre"
    preprocess_dataset(synthetic, out, "ct", workers=1)
    return out


def _reference(entry: dict, modality: str) -> dict:
    """The volume computed in memory with the same MONAI chain (numpy arrays)."""
    chain = get_deterministic_transforms(modality, with_label="label" in entry["source"])
    out = chain(dict(entry["source"]))
    return {k: out[k].numpy() for k in ("image", "label") if k in out}


def _check_image(stored: np.ndarray, expected: np.ndarray) -> None:
    """``stored`` (float16 file or float32 crop of it) equals ``expected`` within float16 rounding."""
    assert np.array_equal(stored.astype(np.float16), expected.astype(np.float16))
    bound = F16_ERROR * np.abs(expected) + 1e-7  # + subnormals
    assert np.all(np.abs(stored.astype(np.float32) - expected) <= bound)


# --------------------------------------------------------------------------------------------------
# the stored volumes and the crops equal the in-memory chain
# --------------------------------------------------------------------------------------------------


def test_the_deterministic_chain_is_the_training_chain_before_its_padding(synthetic):
    names = [type(t).__name__ for t in get_deterministic_transforms("ct", with_label=True).transforms]
    assert names == ["LoadImaged", "ReplaceNonFinited", "Orientationd", "Spacingd", "ScaleIntensityRanged",
                     "CropForegroundd"]  # fmt: skip
    names = [type(t).__name__ for t in get_deterministic_transforms("mri").transforms]
    assert names == ["LoadImaged", "ReplaceNonFinited", "Orientationd", "Spacingd", "CropForegroundd",
                     "NormalizeIntensityd"]  # fmt: skip
    item = {key: str(synthetic / f"{key}sTr/phantom_000.nii.gz") for key in ("image", "label")}
    tight = get_deterministic_transforms("ct", with_label=True, margin=0)(dict(item))
    # the training chain, validation mode, with the crop size equal to the volume: padding and centre crop are no-ops
    size = tuple(tight["image"].shape[1:])
    training = get_pretrain_transforms("ct", roi_size=size, train=False, with_label=True)(dict(item))
    assert torch.equal(tight["image"].as_tensor(), training["image"].as_tensor())
    assert torch.equal(tight["label"].as_tensor(), training["label"].as_tensor())
    wide = get_deterministic_transforms("ct", with_label=True)(dict(item))
    assert all(w >= t for w, t in zip(wide["image"].shape[1:], size)) and wide["image"].shape[1:] != size
    with pytest.raises(ValueError, match="margin must be an int >= 0"):
        get_deterministic_transforms("ct", margin=-1)


@pytest.mark.parametrize("dataset, modality, roi", [
    ("synthetic", "ct", (16, 16, 12)),
    ("scanner", "ct", (16, 16, 24)),  # the LPS volume has about 17 slices of 2 mm: padded along z
    ("mri", "mri", (20, 20, 16)),
])  # fmt: skip
def test_round_trip_file_and_crops_equal_the_in_memory_chain(dataset, modality, roi, request, tmp_path):
    raw = request.getfixturevalue(dataset)
    manifest = preprocess_dataset(raw, tmp_path / "pre", modality, workers=1)
    preset = load_data_preset(modality)
    assert manifest["complete"] and manifest["format_version"] == pre.FORMAT_VERSION
    assert manifest["preset"]["settings"]["pixdim"] == preset["pixdim"]
    for entry in manifest["volumes"]:
        ref = _reference(entry, modality)
        image = np.load(tmp_path / "pre" / entry["files"]["image"])
        assert image.dtype == np.float16 and list(image.shape) == entry["shape"] == list(ref["image"].shape)
        assert np.isfortran(image)  # axial slices are contiguous
        _check_image(image, ref["image"])
        assert entry["spacing"] == pytest.approx(preset["pixdim"])
        header = nib.load(entry["source"]["image"])
        assert entry["original_shape"] == list(header.shape)
        assert np.allclose(entry["original_affine"], header.affine)
        stats = entry["stats"]
        values = image.astype(np.float32)
        assert stats["min"] == values.min() and stats["max"] == values.max()
        assert stats["mean"] == pytest.approx(values.mean(dtype=np.float64))
        assert stats["std"] == pytest.approx(values.std(dtype=np.float64))
        assert [stats["p0.5"], stats["p99.5"]] == pytest.approx(np.percentile(values, [0.5, 99.5]).tolist())
        if modality == "ct":
            assert 0.0 <= stats["min"] <= stats["max"] <= 1.0
        if "label" in entry["source"]:
            label = np.load(tmp_path / "pre" / entry["files"]["label"])
            assert label.dtype == np.uint8 and label.shape == ref["label"].shape
            assert np.array_equal(label, ref["label"])  # exact
            assert label.max() >= 1
    for split, names in manifest["splits"].items():
        with_label = "label" in manifest["volumes"][0]["source"]
        ds = PreprocessedCropDataset(tmp_path / "pre", split, roi, num_samples=3, with_label=with_label, seed=7)
        assert len(ds) == len(names)
        for i in range(len(ds)):
            items, starts = ds[i], ds.crop_starts(i)
            ref = _reference(ds.volumes[i], modality)
            padded = {k: SpatialPad(roi)(torch.from_numpy(v)).numpy() for k, v in ref.items()}
            assert len(items) == 3
            for item, start in zip(items, starts):
                box = (slice(None), *(slice(s, s + r) for s, r in zip(start, roi)))
                assert item["image"].dtype == torch.float32 and tuple(item["image"].shape) == (1, *roi)
                _check_image(item["image"].numpy(), padded["image"][box])
                if with_label:
                    assert item["label"].dtype == torch.float32 and tuple(item["label"].shape) == (1, *roi)
                    assert np.array_equal(item["label"].numpy(), padded["label"][box])


def test_scanner_headers_are_what_the_fixture_claims(scanner):
    """The round trip above covers an LPS int16 volume with a scl_slope and an anisotropic one."""
    lps = nib.load(scanner / "img" / "lps_slope.nii.gz")
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S") and lps.header.get_zooms() == pytest.approx((0.9, 0.9, 3.0))
    assert lps.get_data_dtype() == np.int16 and lps.dataobj.slope not in (0.0, 1.0)
    assert nib.load(scanner / "img" / "aniso.nii.gz").header.get_zooms() == pytest.approx((0.7, 0.8, 2.5))
    out = get_deterministic_transforms("ct")({"image": str(scanner / "img" / "lps_slope.nii.gz")})["image"]
    assert nib.aff2axcodes(out.affine.numpy()) == ("R", "A", "S")
    assert [round(float(s), 6) for s in out.pixdim] == [1.5, 1.5, 2.0]


def test_crops_in_2d_are_slices(ct_out):
    manifest = read_manifest(ct_out)
    ds = PreprocessedCropDataset(ct_out, roi_size=(24, 20), spatial_dims=2, num_samples=4, with_label=True, seed=1)
    for i in range(len(ds)):
        stored = {k: np.load(ct_out / ds.volumes[i]["files"][k]).astype(np.float32) for k in ("image", "label")}
        for item, (x, y, z) in zip(ds[i], ds.crop_starts(i)):
            for key in ("image", "label"):
                assert tuple(item[key].shape) == (1, 24, 20)
                assert np.array_equal(item[key].numpy(), stored[key][:, x : x + 24, y : y + 20, z])
    # across the first axis, with a crop taller than the volume along z (zero-padded, centred)
    depth = manifest["volumes"][0]["shape"][3]
    sagittal = PreprocessedCropDataset(ct_out, roi_size=(16, depth + 6), spatial_dims=2, seed=2, slice_axis=0)
    item, start = sagittal[0][0], sagittal.crop_starts(0)[0]
    assert tuple(item["image"].shape) == (1, 16, depth + 6) and start[2] == 0
    assert torch.all(item["image"][:, :, :3] == 0) and torch.all(item["image"][:, :, -3:] == 0)
    stored = np.load(ct_out / sagittal.volumes[0]["files"]["image"])
    expected = stored[0, start[0], start[1] : start[1] + 16, :].astype(np.float32)
    assert np.array_equal(item["image"][0, :, 3:-3].numpy(), expected)
    # an axial slice of the mapped file is one contiguous block
    assert np.load(ct_out / manifest["volumes"][0]["files"]["image"], mmap_mode="r")[..., 5].flags.f_contiguous


def test_dataset_randomness_transform_and_errors(ct_out, monkeypatch):
    fixed = PreprocessedCropDataset(ct_out, roi_size=12, num_samples=2, seed=3)
    again = PreprocessedCropDataset(ct_out, roi_size=12, num_samples=2, seed=3)
    assert fixed.crop_starts(1) == again.crop_starts(1)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(fixed[1], again[1]))
    again.set_epoch(1)
    assert fixed.crop_starts(1) != again.crop_starts(1)
    torch.manual_seed(0)
    free = PreprocessedCropDataset(ct_out, roi_size=12, num_samples=2)
    first = free.crop_starts(0)
    torch.manual_seed(0)
    assert free.crop_starts(0) == first  # torch's generator drives seed=None

    flip = Compose([RandFlipd(keys=["image", "label"], prob=1.0, spatial_axis=0),
                    RandScaleIntensityd("image", factors=0.1, prob=0.5)])  # fmt: skip
    flipped = PreprocessedCropDataset(ct_out, roi_size=12, num_samples=2, with_label=True, seed=3, transform=flip)
    labelled = PreprocessedCropDataset(ct_out, roi_size=12, num_samples=2, with_label=True, seed=3)
    for a, b in zip(labelled[0], flipped[0]):  # MONAI dict transforms per crop, label flipped with the image
        assert torch.equal(torch.as_tensor(b["label"]), a["label"].flip(1)) and b["image"].shape == a["image"].shape
    repeat = PreprocessedCropDataset(ct_out, roi_size=12, num_samples=2, with_label=True, seed=3, transform=flip)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(flipped[0], repeat[0]))
    # each item maps its files afresh: the dataset holds no open map to carry across a DataLoader fork
    opened = []
    real_load = np.load
    monkeypatch.setattr(crops.np, "load", lambda *a, **k: opened.append(k.get("mmap_mode")) or real_load(*a, **k))
    fixed[0], fixed[0], labelled[0]  # two crops each: one map per file and item
    assert opened == ["r"] * 4 and not [v for v in vars(fixed).values() if isinstance(v, np.ndarray)]
    assert len(pickle.loads(pickle.dumps(fixed))) == len(fixed)
    with pytest.raises(ValueError, match=r"no volumes in split 'test'; volumes per split: \{'training': 3, 'valid"):
        PreprocessedCropDataset(ct_out, split="test")
    with pytest.raises(ValueError, match="roi_size must be 3 positive ints"):
        PreprocessedCropDataset(ct_out, roi_size=(16, 16))
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        PreprocessedCropDataset(ct_out, num_samples=0)


def test_the_dataset_feeds_the_monai_collate_and_mae_prepare_batch(ct_out):
    ds = PreprocessedCropDataset(ct_out, roi_size=(16, 16, 16), num_samples=2, with_label=True, seed=0)
    batch = next(iter(DataLoader(ds, batch_size=2, num_workers=0)))
    assert tuple(batch["image"].shape) == (4, 1, 16, 16, 16) and tuple(batch["label"].shape) == (4, 1, 16, 16, 16)
    images, targets, args, kwargs = MAEPrepareBatch()(batch)
    assert images.shape == (4, 1, 16, 16, 16) and torch.equal(images, targets)


# --------------------------------------------------------------------------------------------------
# storage layout: crops as stored, converted back after collation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("roi, spatial_dims, slice_axis", [
    ((16, 12, 20), 3, -1),
    ((48, 44, 40), 3, -1),  # larger than every volume (about 40 x 37 x 32) on each axis: zero-padded, centred
    ((24, 20), 2, -1),  # axial slices, stored (C, Y, X)
    ((16, 40), 2, 0),  # sagittal slices padded along z, stored (C, Z, Y)
], ids=["3d", "3d_padded", "2d_axial", "2d_sagittal_padded"])  # fmt: skip
def test_storage_layout_crops_converted_back_equal_the_default_crops(ct_out, roi, spatial_dims, slice_axis):
    options = {"roi_size": roi, "num_samples": 2, "with_label": True, "spatial_dims": spatial_dims, "seed": 5,
               "slice_axis": slice_axis}  # fmt: skip
    default = PreprocessedCropDataset(ct_out, **options)
    stored = PreprocessedCropDataset(ct_out, **options, storage_layout=True)
    crop, plain = stored[1][0], default[1][0]
    for key, dtype in (("image", torch.float16), ("label", torch.uint8)):  # the files' dtypes, axes reversed
        assert crop[key].dtype == dtype and crop[key].is_contiguous() and tuple(crop[key].shape) == (1, *roi[::-1])
        assert torch.equal(crop[key].permute(0, *range(spatial_dims, 0, -1)).float(), plain[key])
    batches = [next(iter(DataLoader(ds, batch_size=3, num_workers=0))) for ds in (default, stored)]
    converted = from_storage_layout(batches[1])  # (6, 1, *roi[::-1]) -> (6, 1, *roi)
    for key in ("image", "label"):
        assert converted[key].dtype == torch.float32 and converted[key].is_contiguous()
        assert torch.equal(converted[key], batches[0][key])


def test_storage_layout_refuses_a_crop_transform_and_from_storage_layout_checks_its_input(ct_out):
    with pytest.raises(ValueError, match=r"transform=.* cannot run with storage_layout=True"):
        PreprocessedCropDataset(ct_out, roi_size=12, transform=RandFlipd("image", prob=1.0), storage_layout=True)
    with pytest.raises(ValueError, match=r"must be a \(B, C, H, W\[, D\]\) tensor, got \(1, 8, 8\)"):
        from_storage_layout(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match=r"none of the entries \['image', 'label'\] as tensors; keys are \['name'\]"):
        from_storage_layout({"name": ["a"]})
    image = torch.arange(24, dtype=torch.float16).reshape(1, 1, 4, 3, 2)  # (B, C, Z, Y, X)
    out = from_storage_layout({"image": image, "name": ["a"]})
    assert out["name"] == ["a"] and out["image"].shape == (1, 1, 2, 3, 4) and out["image"][0, 0, 1, 2, 3] == 23


# --------------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------------


def test_resume_redoes_only_damaged_volumes(synthetic, tmp_path, caplog):
    out = tmp_path / "pre"
    first = preprocess_dataset(synthetic, out, "ct", workers=1)
    arrays = {p.relative_to(out): np.load(p) for p in sorted(out.glob("*/*.npy"))}
    assert len(arrays) == 8
    ids = {p: (out / p).stat().st_ino for p in arrays}
    (out / "images/phantom_000.npy").unlink()  # an entry whose file is gone
    label = out / "labels/phantom_001.npy"
    label.write_bytes(label.read_bytes()[:500])  # a torn file
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["volumes"] = [v for v in manifest["volumes"] if v["name"] != "phantom_002"]  # files without an entry
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "images/.phantom_003.npy.abcd1234.tmp").write_bytes(b"partial")  # stray temporary files
    (out / ".manifest.json.x1y2.tmp").write_text("{")
    with pytest.raises(ValueError, match=r"incomplete preprocessing, 3 of 4 volumes done"):
        read_manifest(out)

    caplog.set_level(logging.INFO, logger="monai_mae.data.preprocess")
    second = preprocess_dataset(synthetic, out, "ct", workers=1)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert [line.split(":")[0] for line in progress] == ["[1/3] phantom_000", "[2/3] phantom_001", "[3/3] phantom_002"]
    assert second["complete"] and not list(out.rglob("*.tmp"))
    for path, array in arrays.items():
        assert np.array_equal(np.load(out / path), array)
    untouched = [Path("images/phantom_003.npy"), Path("labels/phantom_003.npy")]
    assert all((out / p).stat().st_ino == ids[p] for p in untouched)  # not rewritten
    strip = lambda m: [{k: v for k, v in e.items() if k != "seconds"} for e in m["volumes"]]  # noqa: E731
    assert strip(second) == strip(first) and second["created"] == first["created"]
    assert read_manifest(out)["volumes"] == second["volumes"]
    # a third run has nothing to do
    caplog.clear()
    preprocess_dataset(synthetic, out, "ct", workers=1)
    assert not [r for r in caplog.records if r.getMessage().startswith("[")]
    assert any("4 of 4 volumes already done" in r.getMessage() for r in caplog.records)


def test_worker_processes_give_the_same_result(synthetic, ct_out, tmp_path):
    manifest = preprocess_dataset(synthetic, tmp_path / "pool", "ct", workers=2)
    reference = read_manifest(ct_out)
    assert [e["name"] for e in manifest["volumes"]] == [e["name"] for e in reference["volumes"]]
    for entry, ref in zip(manifest["volumes"], reference["volumes"]):
        assert entry["stats"] == ref["stats"] and entry["bytes"] == ref["bytes"]
        for key, rel in entry["files"].items():
            assert np.array_equal(np.load(tmp_path / "pool" / rel), np.load(ct_out / ref["files"][key]))


def test_a_rerun_with_other_settings_stops_naming_both(synthetic, ct_out, tmp_path):
    out = tmp_path / "pre"
    shutil.copytree(ct_out, out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(ValueError, match=r"pixdim: .* has \[1\.5, 1\.5, 2\.0\], this run has \[1\.0, 1\.0, 1\.0\]"):
        preprocess_dataset(synthetic, out, "ct", workers=1, spacing=1.0)
    with pytest.raises(ValueError, match=r"storage.image_dtype: .* has 'float16', this run has 'float32'"):
        preprocess_dataset(synthetic, out, "ct", workers=1, image_dtype="float32")
    assert (out / "manifest.json").read_text() == before


# --------------------------------------------------------------------------------------------------
# manifest checks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, expected", [
    ({"pixdim": [1.0, 1.0, 1.0]}, r"pixdim: .* has \[1\.5, 1\.5, 2\.0\], the run's preset has \[1\.0, 1\.0, 1\.0\]"),
    ({"a_min": -1000.0}, r"intensity: .*'a_min': -175\.0.*the run's preset has .*'a_min': -1000\.0"),
    ({"a_max": 1000.0}, r"intensity: .*'a_max': 250\.0.*the run's preset has .*'a_max': 1000\.0"),
    ({"modality": "mri", "pixdim": [1.5, 1.5, 2.0]}, r"modality: .* has 'ct', the run's preset has 'mri'"),
])  # fmt: skip
def test_check_manifest_names_both_values(ct_out, change, expected):
    preset = {**load_data_preset("ct"), **change}
    with pytest.raises(ValueError, match=expected):
        check_manifest(ct_out, preset)
    with pytest.raises(ValueError, match=expected):
        PreprocessedCropDataset(ct_out, roi_size=8, preset=preset)


def test_check_manifest_accepts_the_matching_preset(ct_out):
    assert check_manifest(ct_out, "ct")["complete"]
    bundle_preset = {**load_data_preset("ct"), "roi_size": [96, 96, 96], "num_samples": 4, "in_channels": 1,
                     "orientation": "RAS", "spatial_dims": 3}  # fmt: skip
    manifest = read_manifest(ct_out)
    checked = check_manifest(manifest, bundle_preset)
    assert checked == manifest and checked is not manifest
    assert len(PreprocessedCropDataset(ct_out, roi_size=8, preset=bundle_preset)) == 3


def test_the_manifest_carries_the_datalist_labels(synthetic, ct_out, tmp_path):
    manifest = read_manifest(ct_out)
    assert manifest["labels"] == {"0": "background", "1": "organ_1", "2": "organ_2", "3": "organ_3"}
    # a run that reads only the preprocessed folder gets the datalist's classes and names
    assert declared_classes(ct_out) == declared_classes(synthetic)
    assert num_classes_for(ct_out, default=9) == 4
    assert class_names(ct_out, 4) == ["organ_1", "organ_2", "organ_3"]
    with pytest.raises(
        ValueError, match=r"num_classes=3 is too small for .*pre: its labels are .*set num_classes to 4"
    ):
        load_checked_datalist(synthetic, preprocessed_dir=str(ct_out), num_classes=3)
    assert load_checked_datalist(synthetic, preprocessed_dir=str(ct_out), num_classes=4) == []
    # images only: no labels recorded, so the defaults apply
    preprocess_dataset(synthetic, tmp_path / "images_only", "ct", workers=1, labels=False)
    assert read_manifest(tmp_path / "images_only")["labels"] == {}
    assert num_classes_for(tmp_path / "images_only", default=9) == 9
    # another tool's manifest.json is not read
    assert manifest["format"] == datalist_module.MANIFEST_FORMAT == "monai_mae.preprocessed"
    (tmp_path / "other_tool").mkdir()
    (tmp_path / "other_tool" / "manifest.json").write_text(json.dumps({"labels": {"liver": 1}}))
    assert declared_classes(tmp_path / "other_tool") == {}
    # labels that are not whole numbers stop the run before anything is written, naming the file
    bad = tmp_path / "bad_labels"
    shutil.copytree(synthetic, bad)
    datalist = json.loads((bad / "datalist.json").read_text())
    (bad / "datalist.json").write_text(json.dumps({**datalist, "labels": {"0": "background", "x": "liver"}}))
    with pytest.raises(ValueError, match=r"bad_labels/datalist\.json: 'labels' entry 'x'"):
        preprocess_dataset(bad, tmp_path / "bad_out", "ct", workers=1)
    assert not (tmp_path / "bad_out").exists()


def test_read_manifest_errors(ct_out, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found: .* holds no preprocessed dataset"):
        read_manifest(tmp_path / "nothing")
    manifest = json.loads((ct_out / "manifest.json").read_text())
    cases = {
        "version": ({**manifest, "format_version": 99}, r"format version 99 .* reads format version 1"),
        "other": ({"format": "something"}, r"not a monai_mae preprocessing manifest \(format 'something'"),
        "incomplete": ({**manifest, "complete": False, "volumes": manifest["volumes"][:1]},
                       r"incomplete preprocessing, 1 of 4 volumes done"),
        "files": (manifest, r"(?s)8 recorded output file\(s\) are missing or damaged.*phantom_000\.npy \(missing\)"),
    }  # fmt: skip
    for name, (content, expected) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=expected):
            read_manifest(tmp_path / name)
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "manifest.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="line 1"):
        read_manifest(tmp_path / "bad_json")


# --------------------------------------------------------------------------------------------------
# bad inputs, missing datalist, disk space
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def hostile(synthetic, tmp_path) -> Path:
    """Two good volumes and four bad ones: truncated, all NaN, 2D, and a label of another shape."""
    folder = tmp_path / "hostile"
    for i in (0, 1):
        for kind in ("imagesTr", "labelsTr"):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy(synthetic / kind / f"phantom_00{i}.nii.gz", folder / kind / f"good_{i}.nii.gz")
    data = (folder / "imagesTr/good_0.nii.gz").read_bytes()
    (folder / "imagesTr/truncated.nii.gz").write_bytes(data[: len(data) // 2])
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    _save(np.full((20, 20, 16), np.nan, dtype=np.float32), affine, folder / "imagesTr/all_nan.nii.gz")
    _save(np.zeros((20, 20), dtype=np.int16), affine, folder / "imagesTr/flat.nii.gz")
    _save(np.zeros((20, 20, 16), dtype=np.int16), affine, folder / "imagesTr/mismatch.nii.gz")
    _save(np.zeros((20, 20, 12), dtype=np.uint8), affine, folder / "labelsTr/mismatch.nii.gz")
    _datalist(folder, [
        {"image": "imagesTr/good_0.nii.gz", "label": "labelsTr/good_0.nii.gz"},
        {"image": "imagesTr/truncated.nii.gz"},
        {"image": "imagesTr/all_nan.nii.gz"},
        {"image": "imagesTr/flat.nii.gz"},
        {"image": "imagesTr/mismatch.nii.gz", "label": "labelsTr/mismatch.nii.gz"},
    ], [{"image": "imagesTr/good_1.nii.gz", "label": "labelsTr/good_1.nii.gz"}])  # fmt: skip
    return folder


def test_bad_files_stop_before_anything_is_written(hostile, tmp_path):
    out = tmp_path / "pre"
    with pytest.raises(ValueError) as info:
        preprocess_dataset(hostile, out, "ct", workers=1)
    message = str(info.value)
    assert message.startswith("4 of 6 volumes failed the input checks; nothing was written")
    for expected in (
        r"truncated\.nii\.gz: corrupt or truncated NIfTI",
        r"all_nan\.nii\.gz: every one of the 6400 voxels is NaN",
        r"flat\.nii\.gz: 2D image of shape \(20, 20\)",
        r"labelsTr/mismatch\.nii\.gz: label shape \(20, 20, 12\) differs from image .*imagesTr/mismatch\.nii\.gz shape "
        r"\(20, 20, 16\)",
    ):
        assert len(re.findall(expected, message)) == 1, expected
    assert "good_" not in message and not out.exists()


def test_skip_bad_skips_and_records(hostile, tmp_path, caplog):
    manifest = preprocess_dataset(hostile, tmp_path / "pre", "ct", workers=1, skip_bad=True)
    assert [e["name"] for e in manifest["volumes"]] == ["good_0", "good_1"]
    assert manifest["splits"] == {"training": ["good_0"], "validation": ["good_1"]} and manifest["complete"]
    skipped = {s["name"]: s for s in manifest["skipped"]}
    assert sorted(skipped) == ["all_nan", "flat", "mismatch", "truncated"]
    assert skipped["flat"]["split"] == "training"
    assert skipped["flat"]["source"]["image"].endswith("imagesTr/flat.nii.gz")
    assert "2D image" in skipped["flat"]["reasons"][0] and "corrupt or truncated" in skipped["truncated"]["reasons"][0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipping" in r.getMessage()]
    assert len(warnings) == 4 and any("skipping flat" in w and "flat.nii.gz: 2D image" in w for w in warnings)
    assert read_manifest(tmp_path / "pre")["skipped"] == manifest["skipped"]


def test_a_volume_that_fails_in_the_worker_stops_the_run_or_is_skipped(synthetic, tmp_path):
    """A label of class 300 passes the input checks (non-negative integers) but does not fit uint8."""
    folder = tmp_path / "raw"
    shutil.copytree(synthetic, folder)
    label = np.zeros((40, 40, 32), dtype=np.uint16)
    label[10:20, 10:20, 10:20] = 300
    _save(label, nib.load(folder / "labelsTr/phantom_001.nii.gz").affine, folder / "labelsTr/phantom_001.nii.gz")
    expected = r"phantom_001\.nii\.gz: preprocessing failed: ValueError: label values 0\.\.300 do not fit uint8 \(1 of"
    with pytest.raises(ValueError, match=expected):
        preprocess_dataset(folder, tmp_path / "pre", "ct", workers=1)
    assert [e["name"] for e in json.loads((tmp_path / "pre/manifest.json").read_text())["volumes"]] == ["phantom_000"]
    manifest = preprocess_dataset(folder, tmp_path / "pre", "ct", workers=1, skip_bad=True)
    assert manifest["complete"] and [s["name"] for s in manifest["skipped"]] == ["phantom_001"]
    assert "do not fit uint8" in manifest["skipped"][0]["reasons"][0]
    assert manifest["splits"]["training"] == ["phantom_000", "phantom_002"]


def test_a_named_folder_without_datalist_is_an_error(tmp_path):
    empty = tmp_path / "my_ct_data"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"my_ct_data has no datalist\.json"):
        preprocess_dataset(empty, tmp_path / "pre", "ct")
    assert list(empty.iterdir()) == [] and not (tmp_path / "pre").exists()  # no phantoms generated
    with pytest.raises(FileNotFoundError, match="dataset folder .*missing not found"):
        preprocess_dataset(tmp_path / "missing", tmp_path / "pre", "ct")


def test_disk_space_is_estimated_and_checked(synthetic, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="monai_mae.data.preprocess")
    monkeypatch.setattr(checks, "free_bytes", lambda path: (tmp_path, 1000))
    need = f"{4 * (40 * 40 * 32 * 3 + 256) / 1000:.1f} KB"
    with pytest.raises(OSError, match=rf"not enough disk space .* up to {need} needed, 1\.0 KB free") as info:
        preprocess_dataset(synthetic, tmp_path / "pre", "ct", workers=1)
    assert info.value.errno == errno.ENOSPC and not (tmp_path / "pre").exists()
    # 4 volumes of 40 x 40 x 32 voxels at the preset's spacing: float16 image + uint8 label + headers
    assert any(f"need at most {need}" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def test_cli_in_process(synthetic, ct_out, tmp_path, capsys):
    out = tmp_path / "cli"
    assert pre.main([str(synthetic), str(out), "--modality", "ct", "--workers", "1", "--no-labels"]) == 0
    assert "preprocessed 4 volume(s)" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert not (out / "labels").exists() and all(set(e["files"]) == {"image"} for e in manifest["volumes"])
    assert np.array_equal(np.load(out / "images/phantom_002.npy"), np.load(ct_out / "images/phantom_002.npy"))
    for argv, expected in [
        (["--modality", "mri", "--preset", "ct"], r"--modality 'mri' differs from the modality of the preset 'ct'"),
        (["--modality", "ct", "--spacing", "1", "2"], r"--spacing takes 1 or 3 numbers, got \[1\.0, 2\.0\]"),
        (["--modality", "ct", "--preset", "nope"], r"unknown data preset 'nope'"),
    ]:
        with pytest.raises(SystemExit) as info:
            pre.main([str(synthetic), str(tmp_path / "x"), *argv])
        assert info.value.code == 2
        assert re.search(expected, capsys.readouterr().err), expected
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as info:  # the program name the monai-mae command passes
        pre.main(["-h"], prog="monai-mae preprocess")
    assert info.value.code == 0 and capsys.readouterr().out.startswith("usage: monai-mae preprocess [-h] --modality")


def test_preset_file_and_spacing_override(synthetic, tmp_path):
    preset = tmp_path / "my_ct.json"
    preset.write_text(json.dumps({"modality": "ct", "pixdim": [2.0, 2.0, 2.0], "a_min": -500.0, "a_max": 500.0}))
    manifest = preprocess_dataset(synthetic, tmp_path / "pre", "ct", preset=preset, spacing=[3.0, 3.0, 4.0], workers=1)
    settings = manifest["preset"]["settings"]
    assert manifest["preset"]["name"] == "my_ct" and settings["pixdim"] == [3.0, 3.0, 4.0]
    assert settings["intensity"]["a_min"] == -500.0
    assert manifest["volumes"][0]["spacing"] == pytest.approx([3.0, 3.0, 4.0])
    chain = get_deterministic_transforms({"modality": "ct", "pixdim": [3.0, 3.0, 4.0], "a_min": -500.0, "a_max": 500.0})
    expected = chain({"image": manifest["volumes"][0]["source"]["image"]})["image"]
    assert manifest["volumes"][0]["shape"] == list(expected.shape) and expected.shape[3] == 16  # 31 x 2 / 4 + 1 slices


# --------------------------------------------------------------------------------------------------
# gpu_augment (on CPU tensors)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(6, 5, 4), (7, 5)])
def test_gpu_augment_flips_twice_is_identity_and_labels_follow(spatial):
    n = 4
    label = torch.arange(n * int(np.prod(spatial)), dtype=torch.uint8).reshape(n, 1, *spatial)
    image = (label.float() / 10).half()
    batch = {"image": image, "label": label, "name": ["a", "b", "c", "d"]}
    options = {"flip_prob": 0.5, "intensity_shift": 0.0, "intensity_scale": 0.0}
    once = gpu_augment(batch, **options, generator=torch.Generator().manual_seed(5))
    twice = gpu_augment(once, **options, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(once["image"], image)  # something was flipped
    assert torch.equal(twice["image"], image) and torch.equal(twice["label"], label)
    assert torch.equal(once["image"], (once["label"].float() / 10).half())  # labels flipped with their images
    assert once["name"] is batch["name"]
    assert torch.equal(gpu_augment(batch, flip_prob=0.0, intensity_shift=0.0, intensity_scale=0.0)["image"], image)


def test_gpu_augment_intensity_per_sample_keeps_shapes_dtypes_and_finite_values():
    label = torch.arange(3 * 120, dtype=torch.float32).reshape(3, 1, 6, 5, 4)
    image = label / label.max()
    out = gpu_augment({"image": image, "label": label}, flip_prob=0.5, intensity_shift=0.2, intensity_scale=0.3,
                      generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert out["image"].shape == image.shape and out["image"].dtype == image.dtype and out["label"].dtype == label.dtype
    assert torch.isfinite(out["image"]).all()
    assert torch.equal(out["label"].flatten().sort()[0], label.flatten().sort()[0])  # moved, not changed
    for b in range(3):  # image = label / max * (1 + s) + o with |s| <= 0.3, |o| <= 0.2, per sample
        x, y = (out["label"][b] / label.max()).flatten(), out["image"][b].flatten()
        slope = float((y[-1] - y[0]) / (x[-1] - x[0]))
        offset = float(y[0] - slope * x[0])
        assert torch.allclose(y, slope * x + offset, atol=1e-5)
        assert 0.7 - 1e-5 <= slope <= 1.3 + 1e-5 and abs(offset) <= 0.2 + 1e-5
    assert len({round(float(out["image"][b].mean()), 4) for b in range(3)}) == 3  # drawn per sample
    with pytest.raises(ValueError, match=r"batch has no 'image' entry; keys are \['label'\]"):
        gpu_augment({"label": label})
    with pytest.raises(ValueError, match=r"flip_prob must be in \[0, 1\], got 1\.5"):
        gpu_augment({"image": image}, flip_prob=1.5)
    with pytest.raises(ValueError, match=r"does not match"):
        gpu_augment({"image": image, "label": label[:2]})


# --------------------------------------------------------------------------------------------------
# subprocess runs
# --------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_cli_subprocess(synthetic, ct_out, tmp_path):
    out = tmp_path / "pre"
    run = subprocess.run(
        [sys.executable, "-m", "monai_mae.data.preprocess", str(synthetic), str(out), "--modality", "ct",
         "--workers", "2"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "preprocessed 4 volume(s)" in run.stdout
    assert "need at most" in run.stderr and sum("/4] phantom_00" in line for line in run.stderr.splitlines()) == 4
    manifest = read_manifest(out)
    for entry in manifest["volumes"]:
        for rel in entry["files"].values():
            assert np.array_equal(np.load(out / rel), np.load(ct_out / rel))


@pytest.mark.slow
def test_resume_after_kill_9(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "pre"
    write_synthetic_dataset(raw, num=12, num_validation=2, shape=(40, 40, 32), num_organs=3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "monai_mae.data.preprocess", str(raw), str(out), "--modality", "ct", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    deadline, done = time.monotonic() + 240, []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:  # manifest.json of the run's start and the journal of the volumes since
                done = read_manifest(out, require_complete=False, check_files=False)["volumes"]
            except (FileNotFoundError, ValueError):
                done = []
            if done:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and 1 <= len(done) < 12, f"not killed mid-run ({len(done)} done)"
    killed = read_manifest(out, require_complete=False, check_files=False)
    assert not killed["complete"] and (out / ".preprocess.lock").exists()  # the lock file of a dead process
    assert json.loads((out / "manifest.json").read_text())["volumes"] == []  # as written at the start
    assert len((out / "manifest.journal").read_text().splitlines()) >= len(done)  # one line per finished volume
    with pytest.raises(ValueError, match="incomplete preprocessing"):
        read_manifest(out)
    kept = {e["name"]: (out / e["files"]["image"]).stat().st_ino for e in killed["volumes"]}
    manifest = preprocess_dataset(raw, out, "ct", workers=1)
    assert manifest["complete"] and len(manifest["volumes"]) == 12 and not list(out.rglob("*.tmp"))
    assert not (out / "manifest.journal").exists()  # compacted into manifest.json
    assert all((out / f"images/{name}.npy").stat().st_ino == ino for name, ino in kept.items())
    reference = preprocess_dataset(raw, tmp_path / "clean", "ct", workers=1)
    for entry, ref in zip(manifest["volumes"], reference["volumes"]):
        assert entry["stats"] == ref["stats"]
        for rel in entry["files"].values():
            assert np.array_equal(np.load(out / rel), np.load(tmp_path / "clean" / rel))
