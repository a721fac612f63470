"""Tests of monai_mae.data.nnunet_raw: nnU-Net v2 raw dataset folders read as datalists, and the bundles on one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import TINY_NETWORK, run_bundle, write_overrides
from monai.transforms import LoadImaged

from monai_mae.data import (
    ensure_dataset,
    is_nnunet_raw,
    load_datalist,
    nnunet_modality,
    preprocess_dataset,
    read_nnunet_raw,
)
from monai_mae.data import nnunet_raw as raw_module
from monai_mae.data.datalist import validate_datalist
from monai_mae.data.nnunet_raw import validation_cases
from monai_mae.model_file import read_model

SHAPE = (20, 18, 16)


def _save(path: Path, array: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)


def _raw(
    root: Path,
    cases: list[str],
    channels: tuple[str, ...] = ("CT",),
    labels: bool = True,
    test_cases: tuple[str, ...] = (),
    num_training: int | None = None,
    shape: tuple[int, ...] = SHAPE,
    num_classes: int = 3,
) -> Path:
    """An nnU-Net v2 raw folder: channel k of a case holds the value 100 * case index + k, labels 0..num_classes-1."""
    rng = np.random.default_rng(0)
    meta = {
        "channel_names": {str(k): name for k, name in enumerate(channels)},
        "labels": {"background": 0, **{f"organ{i}": i for i in range(1, num_classes)}},
        "numTraining": len(cases) if num_training is None else num_training,
        "file_ending": ".nii.gz",
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for folder, names in (("imagesTr", cases), ("imagesTs", test_cases)):
        for i, case in enumerate(names):
            for k in range(len(channels)):
                image = rng.normal(100.0 * i + k, 1.0, shape).astype(np.float32)
                _save(root / folder / f"{case}_{k:04d}.nii.gz", image)
            if labels and folder == "imagesTr":
                label = np.zeros(shape, np.uint8)
                label[4:12, 4:12, 4:12] = 1
                label[12:16, 12:16, 10:14] = num_classes - 1
                _save(root / "labelsTr" / f"{case}.nii.gz", label)
    return root


def _files(root: Path, entries: list[dict]) -> list[tuple]:
    """Entries as relative paths (a tuple for a multi-channel image)."""

    def rel(path: str) -> str:
        return Path(path).relative_to(root).as_posix()

    return [
        (tuple(rel(p) for p in e["image"]) if isinstance(e["image"], list) else rel(e["image"]),)
        + ((rel(e["label"]),) if "label" in e else ())
        for e in entries
    ]


def test_single_channel_entries_and_default_split(tmp_path):
    root = _raw(tmp_path / "Dataset001_Liver", ["liver_2", "liver_0", "liver_1"], test_cases=("liver_9",))
    assert is_nnunet_raw(root) and not is_nnunet_raw(tmp_path)
    assert _files(root, load_datalist(root, "training", require_label=True)) == [
        ("imagesTr/liver_0_0000.nii.gz", "labelsTr/liver_0.nii.gz"),
        ("imagesTr/liver_1_0000.nii.gz", "labelsTr/liver_1.nii.gz"),
    ]
    validation = load_datalist(root, "validation", require_label=True)
    assert validation == [
        {"image": str(root / "imagesTr/liver_2_0000.nii.gz"), "label": str(root / "labelsTr/liver_2.nii.gz")}
    ]
    assert load_datalist(root, "test") == [{"image": str(root / "imagesTs/liver_9_0000.nii.gz")}]
    with pytest.raises(ValueError, match=r"test\[0\] has no 'label' \(require_label=True\).*labelsTs"):
        load_datalist(root, "test", require_label=True)
    with pytest.raises(ValueError, match=r"nnU-Net raw dataset, no datalist.json\): no list 'fold0'"):
        load_datalist(root, "fold0")
    assert nnunet_modality(root) == "ct"


def test_two_channels_are_a_list_that_loads_as_channels(tmp_path):
    root = _raw(tmp_path / "Dataset002_Brain", ["b0", "b1", "b2"], channels=("T1", "FLAIR"))
    train = load_datalist(root, "training", require_label=True)
    assert _files(root, train) == [
        (("imagesTr/b0_0000.nii.gz", "imagesTr/b0_0001.nii.gz"), "labelsTr/b0.nii.gz"),
        (("imagesTr/b1_0000.nii.gz", "imagesTr/b1_0001.nii.gz"), "labelsTr/b1.nii.gz"),
    ]
    assert validate_datalist(train, ("image", "label"), in_channels=2, num_classes=3) == train
    loaded = LoadImaged(["image", "label"], ensure_channel_first=True, image_only=True)(train[1])
    assert tuple(loaded["image"].shape) == (2, *SHAPE) and tuple(loaded["label"].shape) == (1, *SHAPE)
    # case b1 has index 1: channel k holds values around 100 + k
    means = loaded["image"].mean(dim=(1, 2, 3)).float()
    torch.testing.assert_close(means, torch.tensor([100.0, 101.0]), atol=0.05, rtol=0)
    assert nnunet_modality(root) == "mri"


def test_modality_of_mixed_channels_is_an_error(tmp_path):
    root = _raw(tmp_path / "Dataset003_PetCt", ["p0", "p1"], channels=("CT", "PET"))
    with pytest.raises(ValueError, match=r"dataset\.json: channel_names \['CT', 'PET'\] mix CT and other channels"):
        nnunet_modality(root)


@pytest.mark.parametrize(
    "cases, expected",
    [
        ([f"c{i:02d}" for i in range(10)], ["c04", "c09"]),
        ([f"c{i:02d}" for i in range(12)], ["c05", "c11"]),  # round(12 / 5) = 2, evenly spaced
        ([f"c{i}" for i in range(7)], ["c6"]),
        (["b", "a"], ["b"]),
        (["a"], []),
        ([], []),
    ],
)
def test_validation_cases(cases, expected):
    assert validation_cases(cases) == expected
    assert validation_cases(list(reversed(cases))) == expected  # order of the listing does not matter


def test_splits_final_json_fold_0(tmp_path):
    root = _raw(tmp_path / "Dataset004", ["a", "b", "c", "d"])
    folds = [{"train": ["b", "c", "d"], "val": ["a"]}, {"train": ["a", "c", "d"], "val": ["b"]}]
    (root / "splits_final.json").write_text(json.dumps(folds))
    assert [Path(e["image"]).name for e in load_datalist(root, "training")] == [f"{c}_0000.nii.gz" for c in "bcd"]
    assert [Path(e["image"]).name for e in load_datalist(root, "validation")] == ["a_0000.nii.gz"]
    (root / "splits_final.json").write_text(json.dumps([{"train": ["b", "c"], "val": ["a", "zz"]}]))
    with pytest.raises(ValueError, match=r"splits_final\.json: fold 0 'val' names case\(s\) \['zz'\] that imagesTr"):
        load_datalist(root, "validation")
    (root / "splits_final.json").write_text(json.dumps([{"train": ["a", "b"], "val": ["a"]}]))
    with pytest.raises(ValueError, match=r"fold 0 has case\(s\) \['a'\] in both 'train' and 'val'"):
        read_nnunet_raw(root)
    (root / "splits_final.json").write_text(json.dumps({"train": ["a"]}))
    with pytest.raises(ValueError, match=r"splits_final\.json: expected a list of folds"):
        read_nnunet_raw(root)


def test_one_case_trains_and_has_no_validation_list(tmp_path):
    root = _raw(tmp_path / "Dataset005", ["only"])
    assert _files(root, load_datalist(root, "training")) == [("imagesTr/only_0000.nii.gz", "labelsTr/only.nii.gz")]
    with pytest.raises(ValueError, match=r"'validation' is empty: imagesTr holds 1 case\(s\); .*splits_final\.json"):
        load_datalist(root, "validation")
    with pytest.raises(ValueError, match=r"'test' is empty: there is no .*imagesTs"):
        load_datalist(root, "test")


def test_unlabelled_images_for_pretraining(tmp_path):
    root = _raw(tmp_path / "Dataset006", ["u0", "u1", "u2"], labels=False)
    assert _files(root, load_datalist(root, "training")) == [("imagesTr/u0_0000.nii.gz",), ("imagesTr/u1_0000.nii.gz",)]
    with pytest.raises(ValueError, match=r"training\[0\] has no 'label' \(require_label=True\): no .*labelsTr folder"):
        load_datalist(root, "training", require_label=True)


def test_a_datalist_json_takes_precedence(tmp_path):
    root = _raw(tmp_path / "Dataset007", ["a", "b", "c"])
    (root / "datalist.json").write_text(json.dumps({"training": [{"image": "imagesTr/c_0000.nii.gz"}]}))
    assert load_datalist(root) == [{"image": str(root / "imagesTr/c_0000.nii.gz")}]
    assert ensure_dataset(root) == root / "datalist.json"


def test_ensure_dataset_reads_the_folder_and_writes_nothing(tmp_path):
    root = _raw(tmp_path / "Dataset008", ["a", "b"])
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert ensure_dataset(root, synthetic_if_missing=True) == root / "dataset.json"
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no phantoms, no datalist.json
    (root / "labelsTr/b.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"case 'b' of .*imagesTr has no label .*labelsTr/b\.nii\.gz"):
        ensure_dataset(root)


def _rename(path: Path, name: str) -> None:
    path.rename(path.with_name(name))


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda r: (r / "imagesTr/b_0001.nii.gz").unlink(),
            r"case 'b' of .*imagesTr: missing channel file\(s\) .*imagesTr/b_0001\.nii\.gz; dataset\.json's channel_names "
            r"has 2 channel\(s\) \['T1', 'T2'\]",
        ),
        (
            lambda r: _save(r / "labelsTr/zz.nii.gz", np.zeros(SHAPE, np.uint8)),
            r"labelsTr/zz\.nii\.gz: label without image \(no .*imagesTr/zz_0000\.nii\.gz\)",
        ),
        (
            lambda r: _save(r / "imagesTr/a_0002.nii.gz", np.zeros(SHAPE, np.float32)),
            r"imagesTr/a_0002\.nii\.gz: channel 2, but dataset\.json's channel_names has 2 channel\(s\) \['T1', 'T2'\]",
        ),
        (
            lambda r: _rename(r / "imagesTr/a_0000.nii.gz", "a.nii.gz"),
            r"imagesTr/a\.nii\.gz: name without the channel suffix; nnU-Net images are named CASE_XXXX\.nii\.gz",
        ),
    ],
    ids=["missing-channel", "label-without-image", "channel-beyond-channel-names", "no-channel-suffix"],
)
def test_bad_case_files(tmp_path, damage, match):
    root = _raw(tmp_path / "Dataset009", ["a", "b", "c"], channels=("T1", "T2"))
    damage(root)
    with pytest.raises(ValueError, match=match):
        load_datalist(root, "training")


def _edit_dataset_json(root: Path, **changes) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del meta[key]
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"numTraining": 5}, r"dataset\.json: numTraining is 5, but .*imagesTr holds 3 case\(s\) of 1 channel\(s\)"),
        (
            {"numTraining": None, "labels": None},
            r"dataset\.json: no 'labels', 'numTraining'; an nnU-Net v2 dataset\.json needs channel_names, labels",
        ),
        ({"channel_names": {"1": "CT"}}, r"'channel_names' keys must be the channel indices 0\.\.0, got \['1'\]"),
        ({"file_ending": ".tif"}, r"dataset\.json: file_ending '\.tif' is not read by MONAI's image readers here"),
        ({"file_ending": "nii.gz"}, r"'file_ending' must be a string like '\.nii\.gz', got 'nii\.gz'"),
        (
            {"dataset": {"a": {"images": ["x.nii.gz"], "label": "y.nii.gz"}}},
            r"file lists given in 'dataset' are not read",
        ),
    ],
    ids=["numTraining", "missing-keys", "channel-indices", "unreadable-ending", "ending-without-dot", "dataset-key"],
)
def test_bad_dataset_json(tmp_path, changes, match):
    root = _raw(tmp_path / "Dataset010", ["a", "b", "c"])
    _edit_dataset_json(root, **changes)
    with pytest.raises(ValueError, match=match):
        load_datalist(root, "training")


def test_malformed_dataset_json_is_named(tmp_path):
    root = _raw(tmp_path / "Dataset014", ["a", "b"])
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"},\n}')
    assert is_nnunet_raw(root)  # imagesTr/ beside it: read as nnU-Net, so the error is about this file
    with pytest.raises(ValueError, match=re.escape(str(root / "dataset.json")) + r": malformed JSON at line 2"):
        load_datalist(root)


def test_file_ending_needs_a_reader(tmp_path, monkeypatch):
    """``.mha`` is read by MONAI through ITK: without it installed, the error names the package."""
    root = _raw(tmp_path / "Dataset011", ["a", "b"])
    _edit_dataset_json(root, file_ending=".mha", numTraining=0)
    monkeypatch.setattr(raw_module, "_module_available", lambda name: False)
    with pytest.raises(ValueError, match=r"file_ending '\.mha' needs the Python package itk .*none is installed"):
        read_nnunet_raw(root)
    monkeypatch.setattr(raw_module, "_module_available", lambda name: name == "itk")
    lists = read_nnunet_raw(root)  # no .mha file in the folder: no case (numTraining 0), no error
    assert lists == {"training": [], "validation": [], "test": []}


def test_png_ending_is_read_as_2d_cases(tmp_path):
    root = _raw(tmp_path / "Dataset012", ["a"], labels=False)
    _edit_dataset_json(root, file_ending=".png", numTraining=2)
    for case in ("s0", "s1"):
        (root / "imagesTr" / f"{case}_0000.png").write_bytes(b"")  # names only; not read here
    assert _files(root, load_datalist(root, "training")) == [("imagesTr/s0_0000.png",)]  # the .nii.gz is ignored


def test_preprocess_reads_a_raw_folder(tmp_path):
    root = _raw(tmp_path / "Dataset013_Brain", ["b0", "b1", "b2"], channels=("T1", "T2"))
    manifest = preprocess_dataset(root, tmp_path / "pre", "mri", workers=1, in_channels=2)
    assert [(v["name"], v["split"]) for v in manifest["volumes"]] == [
        ("b0_0000", "training"),
        ("b1_0000", "training"),
        ("b2_0000", "validation"),
    ]
    volume = manifest["volumes"][2]
    assert volume["source"] == {
        "image": [str(root / "imagesTr/b2_0000.nii.gz"), str(root / "imagesTr/b2_0001.nii.gz")],
        "label": str(root / "labelsTr/b2.nii.gz"),
    }
    image = np.load(tmp_path / "pre" / volume["files"]["image"])
    assert image.shape[0] == 2 and np.load(tmp_path / "pre" / volume["files"]["label"]).shape[1:] == image.shape[1:]


@pytest.mark.slow
def test_finetune_and_pretrain_bundles_on_a_raw_folder(tmp_path):
    """Both bundles read a 2-channel MRI raw folder with no datalist.json: modality from channel_names."""
    root = _raw(tmp_path / "Dataset020_Tiny", ["c0", "c1", "c2"], channels=("T1", "T2"), shape=(24, 24, 20))
    modality = ["--modality", "$monai_mae.data.nnunet_modality(@dataset_dir)", "--network_def#in_channels", "2"]
    tiny = dict(roi_size=[16, 16, 16], batch_size=1, num_samples=1, num_workers=0, warmup_epochs=1, val_interval=1,
                sw_batch_size=1, progress_bar=False, deterministic=True, max_epochs=1)  # fmt: skip
    overrides = write_overrides(
        tmp_path / "tiny_seg.json", **tiny, num_classes=3, architecture="unet",
        **{"unet#channels": [4, 8], "unet#strides": [2]},
    )  # fmt: skip
    result = run_bundle(
        "mae_finetune", "train.json", overrides, "--dataset_dir", str(root), "--output_dir", str(tmp_path / "seg"),
        *modality,
    )  # fmt: skip
    assert "nnU-Net raw dataset (no datalist.json): 2 training, 1 validation, 0 test" in result.stdout + result.stderr
    assert "Epoch[1] Complete" in result.stdout and "val_mean_dice" in result.stdout
    model = read_model(tmp_path / "seg" / "models" / "model.pt")
    assert model.data_preset["modality"] == "mri" and model.data_preset["in_channels"] == 2
    assert model.network["_target_"] == "monai.networks.nets.UNet" and model.network["in_channels"] == 2

    overrides = write_overrides(
        tmp_path / "tiny_mae.json", **{**tiny, "batch_size": 2, "num_samples": 1}, patch_size=[8, 8, 8], **TINY_NETWORK
    )
    result = run_bundle(
        "mae_pretrain", "train.json", overrides, "--dataset_dir", str(root), "--output_dir", str(tmp_path / "mae"),
        *modality,
    )  # fmt: skip
    assert "Epoch[1] Complete" in result.stdout
    model = read_model(tmp_path / "mae" / "models" / "model.pt")
    assert model.data_preset["modality"] == "mri" and model.network["in_channels"] == 2
    assert re.search(r"Metrics -- val_loss: [0-9.]+", result.stdout)
