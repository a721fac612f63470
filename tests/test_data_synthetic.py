"""Tests of monai_mae.data.synthetic: phantoms, the dataset writer, ensure_dataset and the CLI."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_mae.data.synthetic import LAYOUTS, ORGAN_TYPES, ensure_dataset, make_phantom, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = (32, 32, 24)
SPACING = (1.5, 1.5, 2.0)


def _inside_tissue_on_both_sides(image: np.ndarray, mask: np.ndarray, axis: int) -> bool:
    """Whether every voxel of ``mask`` has body (> -500 HU) before and after it along ``axis``."""
    tissue = np.moveaxis(image > -500.0, axis, 0)
    m = np.moveaxis(mask, axis, 0)
    before = np.cumsum(tissue, axis=0) - tissue > 0  # some tissue strictly before
    after = np.cumsum(tissue[::-1], axis=0)[::-1] - tissue > 0  # some tissue strictly after
    return bool(np.all(before[m]) and np.all(after[m]))


@pytest.mark.parametrize("shape", [TINY, (24, 40, 16), (96, 96, 64)])
def test_phantom_shape_dtype_and_determinism(shape):
    image, label = make_phantom(shape, seed=7)
    assert image.shape == shape and label.shape == shape
    assert image.dtype == np.float32 and label.dtype == np.uint8
    image2, label2 = make_phantom(shape, seed=7)
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(label, label2)
    image3, label3 = make_phantom(shape, seed=8)
    assert not np.array_equal(image, image3)
    assert not np.array_equal(label, label3)


@pytest.mark.parametrize("num_organs", [0, 1, 3, 4, 6])
@pytest.mark.parametrize("shape", [TINY, (96, 96, 64)])
def test_phantom_labels_are_exactly_the_organs(shape, num_organs):
    _, label = make_phantom(shape, seed=3, num_organs=num_organs)
    assert set(np.unique(label).tolist()) == set(range(num_organs + 1))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_phantom_hounsfield_values(seed):
    image, label = make_phantom((96, 96, 64), seed=seed, num_organs=4)
    corners = image[np.ix_([0, -1], [0, -1], [0, -1])]
    np.testing.assert_allclose(corners, -1000.0, atol=60.0)  # air, plus noise
    assert image.min() >= -1024.0 and image.max() <= 3071.0
    body = image > -500.0
    fat = (image > -200.0) & (image < -50.0) & (label == 0)
    soft = (image > -30.0) & (image < 80.0) & (label == 0)
    assert fat.sum() > 0.03 * body.sum() and soft.sum() > 0.5 * body.sum()
    means = {name: float(image[label == k + 1].mean()) for k, (name, *_) in enumerate(ORGAN_TYPES[:4])}
    assert 40.0 < means["liver"] < 100.0
    assert 0.0 < means["kidney"] < 90.0
    assert means["bone"] > 300.0
    assert means["lung"] < -600.0


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("shape", [TINY, (96, 96, 64)])
def test_organs_lie_inside_the_body(shape, seed):
    image, label = make_phantom(shape, seed=seed)
    organs = label > 0
    for axis in (0, 1):  # the body is a cylinder along z: each organ has tissue around it in x and y
        assert _inside_tissue_on_both_sides(image, organs, axis)
    for k in range(1, 5):
        coords = np.argwhere(label == k)
        assert coords.min() > 0 and np.all(coords.max(axis=0) < np.array(shape) - 1)


@pytest.mark.parametrize("seed", range(5))
def test_organs_survive_quarter_resolution(seed):
    _, label = make_phantom((96, 96, 64), seed=seed)
    assert set(np.unique(label[::4, ::4, ::4]).tolist()) == {0, 1, 2, 3, 4}


def test_random_layout_is_the_default():
    for a, b in zip(make_phantom(TINY, seed=2), make_phantom(TINY, seed=2, layout="random")):
        np.testing.assert_array_equal(a, b)
    assert LAYOUTS == ("random", "anatomical")


@pytest.mark.parametrize("num_organs", [0, 4, 5, 7])
@pytest.mark.parametrize("shape", [(40, 40, 32), (96, 96, 64)])
def test_anatomical_phantom_labels_inside_the_body_and_deterministic(shape, num_organs):
    image, label = make_phantom(shape, seed=4, num_organs=num_organs, layout="anatomical")
    assert set(np.unique(label).tolist()) == set(range(num_organs + 1))  # organs 6, 7: random placement
    for axis in (0, 1):
        assert _inside_tissue_on_both_sides(image, label > 0, axis)
    again = make_phantom(shape, seed=4, num_organs=num_organs, layout="anatomical")
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(label, again[1])


@pytest.mark.parametrize("seed", range(6))
def test_anatomical_layout_keeps_the_organs_in_place(seed):
    shape = (96, 96, 64)
    image, label = make_phantom(shape, seed=seed, num_organs=5, layout="anatomical")
    body = np.argwhere(image > -500.0)
    cx, cy = body[:, 0].mean(), body[:, 1].mean()
    centre = {name: np.argwhere(label == k + 1).mean(axis=0) for k, (name, *_) in enumerate(ORGAN_TYPES)}
    size = {name: int((label == k + 1).sum()) for k, (name, *_) in enumerate(ORGAN_TYPES)}
    assert centre["liver"][0] > cx + 5 and centre["spleen"][0] < cx - 10  # liver right (+x in RAS), spleen left
    assert centre["kidney"][0] < cx - 5 and centre["kidney"][1] < cy - 5  # posterior left
    assert abs(centre["bone"][0] - cx) < 3 and centre["bone"][1] < cy - 10  # spine: midline, posterior
    assert centre["lung"][2] > 0.7 * shape[2] > centre["liver"][2]  # lung on top
    assert size["liver"] == max(size.values())
    assert np.ptp(np.argwhere(label == 3)[:, 2]) > 0.5 * shape[2]  # the spine runs along z
    # similar HU (liver vs spleen) that only position tells apart
    spleen_hu, liver_hu = image[label == 5].mean(), image[label == 1].mean()
    assert 30.0 < spleen_hu < 80.0 and 40.0 < liver_hu < 100.0


def test_anatomical_layout_varies_between_phantoms():
    labels = [make_phantom((64, 64, 48), seed=s, num_organs=5, layout="anatomical")[1] for s in range(3)]
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[1], labels[2])
    overlap = [np.logical_and(labels[0] == 1, other == 1).sum() / (labels[0] == 1).sum() for other in labels[1:]]
    assert all(0.3 < o < 1.0 for o in overlap)  # the liver moves a little, but stays where livers are


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shape": (32, 32)}, r"shape must be 3 ints, each >= 8, got \(32, 32\)"),
        ({"shape": (32, 4, 24)}, r"shape must be 3 ints, each >= 8, got \(32, 4, 24\)"),
        ({"num_organs": -1}, r"num_organs must be an int in 0..255, got -1"),
        ({"num_organs": 256}, r"num_organs must be an int in 0..255, got 256"),
        ({"shape": (8, 8, 8), "num_organs": 40}, r"could not place organ \d+ of 40 inside a body of shape \(8, 8, 8\)"),
        ({"layout": "atlas"}, r"layout must be one of \('random', 'anatomical'\), got 'atlas'"),
    ],
)
def test_phantom_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_phantom(**kwargs)


def test_write_dataset_files_affine_and_datalist(tmp_path):
    out = tmp_path / "ds"
    path = write_synthetic_dataset(out, num=3, num_validation=1, shape=TINY, spacing=SPACING, seed=4, num_organs=3)
    assert path == out / "datalist.json"
    datalist = json.loads(path.read_text())
    names = [f"phantom_{i:03d}.nii.gz" for i in range(3)]
    entries = [{"image": f"imagesTr/{n}", "label": f"labelsTr/{n}"} for n in names]
    assert datalist["training"] == entries[:2]
    assert datalist["validation"] == entries[2:]
    assert datalist["numTraining"] == 2
    assert datalist["modality"] == {"0": "CT"}
    assert datalist["labels"] == {"0": "background", "1": "organ_1", "2": "organ_2", "3": "organ_3"}
    assert isinstance(datalist["name"], str) and isinstance(datalist["description"], str)
    assert sorted(os.listdir(out)) == ["datalist.json", "imagesTr", "labelsTr"]  # no temp files left
    assert sorted(os.listdir(out / "imagesTr")) == names == sorted(os.listdir(out / "labelsTr"))

    for entry in entries:
        img, lab = nib.load(out / entry["image"]), nib.load(out / entry["label"])
        for nii in (img, lab):
            assert nii.shape == TINY
            np.testing.assert_allclose(np.diag(nii.affine)[:3], SPACING)
            np.testing.assert_allclose(nii.header.get_zooms(), SPACING)
            assert np.all(nii.affine[:3, 3] != 0.0)  # non-zero origin
            assert nib.aff2axcodes(nii.affine) == ("R", "A", "S")
            np.testing.assert_allclose(nii.affine, img.affine)
        hu = np.asanyarray(img.dataobj)
        assert hu.dtype == np.int16 and hu[0, 0, 0] < -900
        assert set(np.unique(np.asanyarray(lab.dataobj)).tolist()) == {0, 1, 2, 3}


def test_write_dataset_is_deterministic_and_without_labels(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", num=2, num_validation=0, shape=TINY, seed=9)
    b = write_synthetic_dataset(tmp_path / "b", num=2, num_validation=0, shape=TINY, seed=9, with_labels=False)
    for name in ("phantom_000.nii.gz", "phantom_001.nii.gz"):
        np.testing.assert_array_equal(
            nib.load(a.parent / "imagesTr" / name).get_fdata(), nib.load(b.parent / "imagesTr" / name).get_fdata()
        )
    first = nib.load(a.parent / "imagesTr/phantom_000.nii.gz").get_fdata()
    second = nib.load(a.parent / "imagesTr/phantom_001.nii.gz").get_fdata()
    assert not np.array_equal(first, second)  # cases get different seeds
    datalist = json.loads(b.read_text())
    assert datalist["training"] == [{"image": "imagesTr/phantom_000.nii.gz"}, {"image": "imagesTr/phantom_001.nii.gz"}]
    assert datalist["validation"] == [] and not (b.parent / "labelsTr").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num": 0}, r"num must be an int >= 1, got 0"),
        ({"num": 2, "num_validation": 3}, r"num_validation must be an int in 0..num \(2\), got 3"),
        ({"spacing": (1.0, 0.0, 1.0)}, r"spacing must be 3 positive numbers \(mm\), got \(1.0, 0.0, 1.0\)"),
        ({"shape": (32, 32)}, r"shape must be 3 ints"),
        ({"layout": "Anatomical"}, r"layout must be one of \('random', 'anatomical'\), got 'Anatomical'"),
    ],
)
def test_write_dataset_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_synthetic_dataset(tmp_path / "ds", **{"shape": TINY, **kwargs})
    assert not (tmp_path / "ds" / "datalist.json").exists()


def test_ensure_dataset_generates_only_once(tmp_path, caplog):
    target = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="monai_mae.data.synthetic"):
        path = ensure_dataset(target, synthetic_if_missing=True, num=2, num_validation=1, shape=TINY)
    assert path == target / "datalist.json" and path.is_file()
    assert "generating the synthetic phantom dataset" in caplog.text
    image = target / "imagesTr/phantom_000.nii.gz"
    stamps = (path.stat().st_mtime_ns, image.stat().st_mtime_ns)
    time.sleep(0.01)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="monai_mae.data.synthetic"):
        assert ensure_dataset(target, synthetic_if_missing=True, num=5, shape=TINY) == path
        assert ensure_dataset(target) == path  # an existing datalist needs no flag
    assert caplog.text == ""
    assert (path.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps
    assert len(json.loads(path.read_text())["training"]) == 1  # not regenerated with num=5


def test_ensure_dataset_completes_a_half_written_folder(tmp_path):
    target = tmp_path / "data"
    (target / "imagesTr").mkdir(parents=True)
    (target / "imagesTr" / "phantom_000.nii.gz").write_bytes(b"half")  # crashed writer: no datalist.json
    path = ensure_dataset(target, synthetic_if_missing=True, num=2, num_validation=0, shape=TINY)
    assert nib.load(target / "imagesTr" / "phantom_000.nii.gz").shape == TINY
    assert len(json.loads(path.read_text())["training"]) == 2


@pytest.mark.parametrize("exists", [False, True])
def test_ensure_dataset_without_the_flag_stops_before_writing(tmp_path, exists):
    target = tmp_path / "my_ct"  # a folder the user named, e.g. with a typo
    if exists:
        target.mkdir()
    state = "exists but has no datalist.json" if exists else "does not exist"
    message = (
        re.escape(f"dataset_dir {str(target)!r} {state}: expected {target / 'datalist.json'}")
        + r".*--synthetic_if_missing True.*"
        + re.escape(f"python -m monai_mae.data.synthetic {target}")
    )
    with pytest.raises(FileNotFoundError, match=message):
        ensure_dataset(target, num=2, shape=TINY)
    with pytest.raises(FileNotFoundError, match=message):
        ensure_dataset(target, synthetic_if_missing="false")
    assert (list(target.iterdir()) == []) if exists else not target.exists()
    path = ensure_dataset(target, synthetic_if_missing="True", num=2, num_validation=1, shape=TINY)
    assert (
        len(json.loads(path.read_text())["training"]) == 1
        and nib.load(target / "imagesTr/phantom_001.nii.gz").shape == TINY
    )


@pytest.mark.parametrize("flag", [1, "yes", None])
def test_ensure_dataset_rejects_a_flag_that_is_not_a_bool(tmp_path, flag):
    with pytest.raises(ValueError, match=re.escape(f"synthetic_if_missing must be True or False, got {flag!r}.")):
        ensure_dataset(tmp_path / "ds", synthetic_if_missing=flag)
    assert not (tmp_path / "ds").exists()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "monai_mae.data.synthetic", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "cli"
    result = _run_cli(str(out), "--num", "3", "--num-validation", "1", "--shape", "32", "32", "24", "--seed", "2")
    assert result.returncode == 0, result.stderr
    assert str(out / "datalist.json") in result.stdout
    datalist = json.loads((out / "datalist.json").read_text())
    assert [e["image"] for e in datalist["training"]] == ["imagesTr/phantom_000.nii.gz", "imagesTr/phantom_001.nii.gz"]
    assert datalist["validation"] == [{"image": "imagesTr/phantom_002.nii.gz", "label": "labelsTr/phantom_002.nii.gz"}]
    assert nib.load(out / "imagesTr/phantom_002.nii.gz").shape == TINY

    no_labels = _run_cli(
        str(tmp_path / "nolab"), "--num", "1", "--num-validation", "0", "--shape", "16", "16", "12", "--no-labels"
    )
    assert no_labels.returncode == 0, no_labels.stderr
    assert json.loads((tmp_path / "nolab/datalist.json").read_text())["training"] == [
        {"image": "imagesTr/phantom_000.nii.gz"}
    ]


@pytest.mark.slow
def test_cli_anatomical_layout_matches_the_writer(tmp_path):
    result = _run_cli(str(tmp_path / "cli"), "--num", "1", "--num-validation", "0", "--shape", "40", "40", "32",
                      "--num-organs", "5", "--layout", "anatomical")  # fmt: skip
    assert result.returncode == 0, result.stderr
    api = write_synthetic_dataset(tmp_path / "api", num=1, num_validation=0, shape=(40, 40, 32), num_organs=5,
                                  layout="anatomical")  # fmt: skip
    assert "5 organs, anatomical layout" in json.loads((tmp_path / "cli/datalist.json").read_text())["description"]
    for sub in ("imagesTr", "labelsTr"):
        np.testing.assert_array_equal(nib.load(tmp_path / "cli" / sub / "phantom_000.nii.gz").get_fdata(),
                                      nib.load(api.parent / sub / "phantom_000.nii.gz").get_fdata())  # fmt: skip
    assert _run_cli(str(tmp_path / "bad"), "--layout", "atlas").returncode == 2


@pytest.mark.slow
def test_cli_rejects_bad_arguments(tmp_path):
    result = _run_cli(str(tmp_path / "bad"), "--num", "0")
    assert result.returncode == 2
    assert "num must be an int >= 1, got 0" in result.stderr
