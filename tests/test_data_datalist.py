"""Tests of monai_mae.data.datalist: loading Decathlon datalists and checking NIfTI files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_mae.data.datalist import (
    check_nifti,
    check_num_classes,
    class_names,
    declared_classes,
    load_checked_datalist,
    load_datalist,
    num_classes_for,
    validate_datalist,
)
from monai_mae.data.synthetic import write_synthetic_dataset

SHAPE = (16, 16, 12)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A 3-case synthetic dataset (2 training, 1 validation) in ``tmp_path/ds``."""
    write_synthetic_dataset(tmp_path / "ds", num=3, num_validation=1, shape=SHAPE, num_organs=2)
    return tmp_path / "ds"


def _write_datalist(dataset: Path, content: dict | str) -> Path:
    path = dataset / "datalist.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_load_resolves_paths_inside_dataset(dataset):
    train = load_datalist(dataset, require_label=True)
    assert train == [
        {
            "image": str(dataset / f"imagesTr/phantom_{i:03d}.nii.gz"),
            "label": str(dataset / f"labelsTr/phantom_{i:03d}.nii.gz"),
        }
        for i in range(2)
    ]
    assert load_datalist(dataset, key="validation") == [
        {"image": str(dataset / "imagesTr/phantom_002.nii.gz"), "label": str(dataset / "labelsTr/phantom_002.nii.gz")}
    ]


def test_load_accepts_dotdot_that_stays_inside_and_plain_test_list(dataset):
    _write_datalist(
        dataset,
        {
            "training": [{"image": "imagesTr/../imagesTr/phantom_000.nii.gz", "fold": 0}],
            "test": ["imagesTr/phantom_001.nii.gz", "imagesTr/phantom_002.nii.gz"],
        },
    )
    assert load_datalist(dataset) == [{"image": str(dataset / "imagesTr/phantom_000.nii.gz"), "fold": 0}]
    assert [d["image"] for d in load_datalist(dataset, key="test")] == [
        str(dataset / "imagesTr/phantom_001.nii.gz"),
        str(dataset / "imagesTr/phantom_002.nii.gz"),
    ]


def test_missing_datalist(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "datalist.json")) + r" not found.*synthetic"):
        load_datalist(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"other\.json not found"):
        load_datalist(tmp_path, datalist_name="other.json")


def test_malformed_json(dataset):
    path = _write_datalist(dataset, '{\n  "training": [\n    {"image": "a.nii.gz",}\n  ]\n}')
    with pytest.raises(ValueError, match=re.escape(f"{path}: malformed JSON at line 3, column 26")):
        load_datalist(dataset)


@pytest.mark.parametrize(
    "content, key, match",
    [
        (None, "testing", r"no key 'testing'; keys present: \[.*'numTraining', .*'training', 'validation'\]"),
        ([1, 2], "training", r"expected a JSON object with a 'training' list, got list"),
        ({"training": []}, "training", r"'training' must be a non-empty list of entries"),
        ({"training": "imagesTr"}, "training", r"'training' must be a non-empty list of entries"),
        (
            {"training": ["imagesTr/phantom_000.nii.gz"]},
            "training",
            r"training\[0\] must be a dict with an 'image' path",
        ),
        (
            {"training": [{"image": "imagesTr/phantom_000.nii.gz"}, {"label": "labelsTr/phantom_001.nii.gz"}]},
            "training",
            r"training\[1\] has no 'image'; keys present: \['label'\]",
        ),
        ({"training": [{"image": 3}]}, "training", r"training\[0\]\['image'\] must be a path or list of paths, got 3"),
    ],
)
def test_bad_datalist_content(dataset, content, key, match):
    path = dataset / "datalist.json" if content is None else _write_datalist(dataset, content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + match):
        load_datalist(dataset, key=key)


def test_require_label(dataset):
    _write_datalist(dataset, {"training": [{"image": "imagesTr/phantom_000.nii.gz"}]})
    assert len(load_datalist(dataset)) == 1
    with pytest.raises(ValueError, match=r"training\[0\] has no 'label' \(require_label=True\)"):
        load_datalist(dataset, require_label=True)


@pytest.mark.parametrize("field, folder", [("image", "imagesTr"), ("label", "labelsTr")])
def test_missing_referenced_file(dataset, field, folder):
    missing = dataset / folder / "phantom_001.nii.gz"
    missing.unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"training\[1\]\['{field}'\] file not found: {re.escape(str(missing))}"
    ):
        load_datalist(dataset)
    assert len(load_datalist(dataset, check_files=False)) == 2


@pytest.mark.parametrize("outside", ["../outside.nii.gz", "imagesTr/../../outside.nii.gz", "/etc/hosts"])
def test_path_outside_dataset_is_rejected(dataset, outside):
    shutil.copy(dataset / "imagesTr/phantom_000.nii.gz", dataset.parent / "outside.nii.gz")  # exists, still rejected
    _write_datalist(dataset, {"training": [{"image": "imagesTr/phantom_000.nii.gz"}, {"image": outside}]})
    resolved = str((dataset / outside).resolve()) if not outside.startswith("/") else outside
    with pytest.raises(
        ValueError, match=rf"training\[1\]\['image'\] = {re.escape(resolved)} points outside the dataset folder"
    ):
        load_datalist(dataset)


def test_check_nifti_returns_shape(dataset):
    assert check_nifti(dataset / "imagesTr/phantom_000.nii.gz") == SHAPE
    nii = dataset / "plain.nii"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), np.eye(4)), nii)
    assert check_nifti(str(nii)) == (5, 6, 7)


def test_check_nifti_truncated(dataset):
    path = dataset / "imagesTr/phantom_000.nii.gz"
    _cut_in_half(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: corrupt or truncated NIfTI (")):
        check_nifti(path)


def test_check_nifti_truncated_uncompressed(tmp_path):
    path = tmp_path / "vol.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
    _cut_in_half(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: corrupt or truncated NIfTI (voxel data ends at byte")):
        check_nifti(path)


def test_check_nifti_corrupt_gzip(dataset):
    path = dataset / "imagesTr/phantom_000.nii.gz"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"{path}: corrupt or truncated NIfTI (")):
        check_nifti(path)


def test_check_nifti_not_gzip_and_missing(tmp_path):
    path = tmp_path / "fake.nii.gz"
    path.write_bytes(b"this is not a gzip file at all" * 20)
    with pytest.raises(ValueError, match=re.escape(f"{path}: corrupt or truncated NIfTI (")):
        check_nifti(path)
    with pytest.raises(FileNotFoundError, match=r"absent\.nii\.gz: NIfTI file not found"):
        check_nifti(tmp_path / "absent.nii.gz")


def test_validate_datalist(dataset):
    items = load_datalist(dataset, require_label=True)
    validate_datalist(items, keys=("image", "label"))  # all good
    label = Path(items[1]["label"])
    _cut_in_half(label)
    validate_datalist(items)  # only images checked by default
    with pytest.raises(
        ValueError, match=rf"datalist entry 1 \['label'\]: {re.escape(str(label))}: corrupt or truncated NIfTI"
    ):
        validate_datalist(items, keys=("image", "label"))
    with pytest.raises(ValueError, match=r"datalist entry 0 has no 'mask'; keys present: \['image', 'label'\]"):
        validate_datalist(items, keys=("mask",))
    with pytest.raises(FileNotFoundError, match=r"datalist entry 0 \['image'\]: file not found: .*vol\.nrrd"):
        validate_datalist([{"image": str(dataset / "vol.nrrd")}])


def test_declared_classes_read_decathlon_and_nnunet_labels(dataset, tmp_path):
    assert declared_classes(dataset) == {0: "background", 1: "organ_1", 2: "organ_2"}
    nnunet = tmp_path / "Dataset001_Liver"
    nnunet.mkdir()
    (nnunet / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": [1, 2]}}))
    assert declared_classes(nnunet) == {0: "background", 1: "tumour", 2: "tumour"}
    assert declared_classes(tmp_path / "empty") == {}
    bad = _write_datalist(dataset, {"labels": {"0": "background", "one": "liver"}, "training": []})
    with pytest.raises(ValueError, match=re.escape(f"{bad}: 'labels' entry 'one'")):
        declared_classes(dataset)


def test_num_classes_too_small_for_the_declared_labels_names_the_setting(dataset):
    check_num_classes(dataset, 3)  # background + 2 organs
    check_num_classes(dataset, 5)  # more channels than labels is allowed
    with pytest.raises(
        ValueError, match=r"num_classes=2 is too small for .*1 organ_1, 2 organ_2; set num_classes to 3"
    ):
        check_num_classes(dataset, 2)
    with pytest.raises(ValueError, match="set num_classes to 3"):
        load_checked_datalist(dataset, "training", require_label=True, num_classes=2)
    assert len(load_checked_datalist(dataset, "training", require_label=True, num_classes=3)) == 2
    # a preprocessed folder reads no datalist; this one has no manifest either, so nothing is checked
    assert load_checked_datalist(dataset, preprocessed_dir=str(dataset / "pre"), num_classes=2) == []


def test_class_names_come_from_the_declared_labels(dataset, tmp_path):
    assert class_names(dataset, 3) == ["organ_1", "organ_2"]
    assert class_names(dataset, 5) == ["organ_1", "organ_2", "class_3", "class_4"]  # undeclared values
    assert class_names(tmp_path / "missing", 3) == ["class_1", "class_2"]
    labels = {"0": "background", "1": "left kidney", "2": "left-kidney", "3": "???", "4": "class_5"}
    _write_datalist(dataset, {"labels": labels, "training": []})
    # made fit for metric names; a clash or an empty name falls back to class_<value>, kept unique
    assert class_names(dataset, 6) == ["left_kidney", "class_2", "class_3", "class_5", "class_5_5"]
    nnunet = tmp_path / "Dataset002_Kidney"
    nnunet.mkdir()
    (nnunet / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "cyst": 2}}))
    assert class_names(nnunet, 3) == ["kidney", "cyst"]
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        class_names(dataset, 1)


def test_num_classes_follow_the_declared_labels(dataset, tmp_path):
    assert num_classes_for(dataset) == 3  # background + organ_1, organ_2
    assert num_classes_for(tmp_path / "missing") == 5 and num_classes_for(tmp_path / "missing", default=2) == 2
    _write_datalist(dataset, {"labels": {"0": "background", "1": "liver", "3": "tumour"}, "training": []})
    assert num_classes_for(dataset) == 4  # the largest value counts, not the number of names
    _write_datalist(dataset, {"labels": {"0": "background"}, "training": []})
    assert num_classes_for(dataset) == 2
    _write_datalist(dataset, {"training": []})  # no labels declared
    assert num_classes_for(dataset, default=7) == 7
