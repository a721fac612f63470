"""Tests of monai_mae.data.transforms: CT/MRI pipelines in 3D and 2D, datasets and presets."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor, PersistentDataset
from monai.transforms import Compose

from monai_mae.data.datalist import load_datalist
from monai_mae.data.synthetic import make_phantom, write_synthetic_dataset
from monai_mae.data.transforms import (
    data_preset_names,
    get_dataset,
    get_pretrain_transforms,
    load_data_preset,
    transform_hash,
)

SHAPE = (32, 32, 24)
SPACING = (1.5, 1.5, 2.0)
NUM_ORGANS = 4


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list[dict]:
    """Two synthetic CT cases with labels (32 x 32 x 24 at 1.5 x 1.5 x 2 mm)."""
    root = tmp_path_factory.mktemp("ct")
    write_synthetic_dataset(root, num=2, num_validation=0, shape=SHAPE, spacing=SPACING, num_organs=NUM_ORGANS)
    return load_datalist(root, require_label=True)


@pytest.fixture(scope="module")
def mri_item(tmp_path_factory) -> dict:
    """An MRI-like volume: positive intensities inside the body, exactly 0 outside."""
    image, _ = make_phantom(SHAPE, seed=5)
    mri = np.where(image > -500.0, image + 1100.0, 0.0).astype(np.float32)
    path = tmp_path_factory.mktemp("mri") / "t1.nii.gz"
    nib.save(nib.Nifti1Image(mri, np.diag([*SPACING, 1.0])), path)
    return {"image": str(path)}


def _seeded(transform: Compose, seed: int = 0) -> Compose:
    transform.set_random_state(seed=seed)
    return transform


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("roi_size", [(16, 16, 16), (8, 12, 20), 16])
def test_ct_3d_train_crops(items, roi_size, num_samples):
    transform = _seeded(get_pretrain_transforms("ct", roi_size=roi_size, pixdim=SPACING, num_samples=num_samples))
    out = transform(items[0])
    expected = (1, *roi_size) if isinstance(roi_size, tuple) else (1, 16, 16, 16)
    assert isinstance(out, list) and len(out) == num_samples
    for sample in out:
        assert tuple(sample["image"].shape) == expected
        assert sample["image"].dtype == torch.float32
        assert float(sample["image"].min()) >= 0.0 and float(sample["image"].max()) <= 1.0
        assert "label" in sample and isinstance(sample["label"], str)  # not loaded without with_label


@pytest.mark.parametrize("train", [True, False])
def test_volume_smaller_than_roi_is_padded(items, train):
    out = _seeded(get_pretrain_transforms("ct", roi_size=(48, 40, 64), pixdim=SPACING, train=train))(items[0])
    for sample in out if train else [out]:
        assert tuple(sample["image"].shape) == (1, 48, 40, 64)
        assert float(sample["image"].min()) == 0.0 and float(sample["image"].max()) <= 1.0


def test_resampling_follows_pixdim(items):
    # 32 x 32 x 24 voxels at 1.5 x 1.5 x 2 mm resampled to 3 mm: half as many voxels in x and y
    out = get_pretrain_transforms("ct", roi_size=(8, 8, 8), pixdim=(3.0, 3.0, 2.0), train=False)(items[0])
    assert tuple(out["image"].shape) == (1, 8, 8, 8)
    np.testing.assert_allclose(np.diag(out["image"].affine.numpy())[:3], (3.0, 3.0, 2.0))


@pytest.mark.parametrize("with_label", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_2d_slices(items, train, with_label):
    transform = _seeded(
        get_pretrain_transforms(
            "ct", roi_size=(16, 20), spatial_dims=2, pixdim=SPACING, num_samples=3, train=train, with_label=with_label
        )
    )
    out = transform(items[0])
    samples = out if train else [out]
    assert len(samples) == (3 if train else 1)
    for sample in samples:
        assert tuple(sample["image"].shape) == (1, 16, 20)
        if with_label:
            assert tuple(sample["label"].shape) == (1, 16, 20)


def test_2d_batches_are_bchw(items):
    transform = get_pretrain_transforms("ct", roi_size=(16, 16), spatial_dims=2, pixdim=SPACING, num_samples=2)
    batch = next(iter(DataLoader(Dataset(items, transform), batch_size=2, num_workers=0)))
    assert tuple(batch["image"].shape) == (4, 1, 16, 16)  # 2 volumes x 2 slices each


def test_2d_validation_takes_the_centre_slice(items):
    out = get_pretrain_transforms(
        "ct", roi_size=(64, 64), spatial_dims=2, pixdim=SPACING, train=False, with_label=True
    )(items[0])
    padded_3d = get_pretrain_transforms("ct", roi_size=(64, 64, 1), pixdim=SPACING, train=False, with_label=True)
    # a 3D (64, 64, 1) centre crop of the same volume is the same slice
    ref = padded_3d(items[0])
    torch.testing.assert_close(out["image"].as_tensor(), ref["image"].as_tensor()[..., 0])
    torch.testing.assert_close(out["label"].as_tensor(), ref["label"].as_tensor()[..., 0])


def test_mri_normalisation(mri_item):
    out = get_pretrain_transforms("mri", roi_size=(48, 48, 48), pixdim=None, train=False)(mri_item)
    image = out["image"].as_tensor()
    assert tuple(image.shape) == (1, 48, 48, 48)
    nonzero = image[image != 0]
    raw = nib.load(mri_item["image"]).get_fdata()
    assert nonzero.numel() == int((raw > 0).sum())  # every foreground voxel kept, background stays 0
    assert abs(float(nonzero.mean())) < 1e-4
    assert abs(float(nonzero.std(unbiased=False)) - 1.0) < 1e-3


def test_mri_train_crops(mri_item):
    out = _seeded(get_pretrain_transforms("MRI", roi_size=(16, 16, 16), pixdim=(1.0, 1.0, 1.0), num_samples=2))(
        mri_item
    )
    assert [tuple(s["image"].shape) for s in out] == [(1, 16, 16, 16)] * 2
    assert float(torch.cat([s["image"].flatten() for s in out]).min()) < 0.0  # normalised, not windowed


@pytest.mark.parametrize("spatial_dims, roi_size", [(3, (16, 16, 16)), (2, (16, 16))])
def test_labels_stay_integer_organs_and_aligned(items, spatial_dims, roi_size):
    transform = _seeded(
        get_pretrain_transforms(
            "ct", roi_size=roi_size, spatial_dims=spatial_dims, pixdim=(1.2, 1.3, 1.7), num_samples=4, with_label=True
        )
    )
    out = transform(items[1])
    labels = torch.stack([s["label"].as_tensor() for s in out])
    assert labels.shape == (4, 1, *roi_size)
    torch.testing.assert_close(labels, labels.round())
    assert set(torch.unique(labels).tolist()) <= set(range(NUM_ORGANS + 1))
    assert bool((labels > 0).any())  # RandCropByPosNegLabeld: crops centred on organs


def test_label_matches_image_after_pipeline(items):
    out = get_pretrain_transforms("ct", roi_size=(48, 48, 48), pixdim=(1.2, 1.3, 1.7), train=False, with_label=True)(
        items[0]
    )
    image, label = out["image"].as_tensor(), out["label"].as_tensor()
    assert image.shape == label.shape == (1, 48, 48, 48)
    assert set(torch.unique(label).tolist()) == set(range(NUM_ORGANS + 1))
    # organ 3 is bone (~550 HU > a_max: ~1 after windowing), organ 1 liver (~70 HU: ~0.58), organ 4 lung (< a_min: ~0)
    assert float(image[label == 3].mean()) > 0.9
    assert 0.4 < float(image[label == 1].mean()) < 0.75
    assert float(image[label == 4].mean()) < 0.1


def test_intensity_jitter_moves_the_image_only_and_only_when_training(items):
    common = dict(roi_size=(16, 16, 16), pixdim=SPACING, with_label=True, flip_prob=0.0, num_samples=4)
    plain = get_pretrain_transforms("ct", **common)
    jittered = get_pretrain_transforms("ct", **common, intensity_shift=0.2, intensity_scale=0.3)
    plain.set_random_state(seed=7)
    jittered.set_random_state(seed=7)  # the same crops: the jitter comes after the crop transform
    for a, b in zip(plain(items[0]), jittered(items[0])):
        assert torch.equal(_plain(a["label"]), _plain(b["label"]))
        x, y = _plain(a["image"]).flatten().double(), _plain(b["image"]).flatten().double()
        # y = x * (1 + s) + t with |s| <= 0.3, |t| <= 0.2: an exact affine map of the crop
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        offset = y.mean() - slope * x.mean()
        assert 0.7 <= slope <= 1.3 and abs(offset) <= 0.2 + 1e-6
        assert not torch.allclose(x, y)
        torch.testing.assert_close(y, slope * x + offset, atol=1e-5, rtol=0)
    validation = dict(roi_size=(16, 16, 16), pixdim=SPACING, train=False)
    assert torch.equal(_plain(get_pretrain_transforms("ct", **validation)(items[0])["image"]),
                       _plain(get_pretrain_transforms("ct", **validation, intensity_shift=0.2, intensity_scale=0.3)(items[0])["image"]))  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"modality": "pet"}, r"modality='pet' is not supported: .*'ct'"),
        ({"roi_size": (16, 16)}, r"roi_size \(16, 16\) has 2 entries but spatial_dims=3"),
        ({"roi_size": (16, 16, 16), "spatial_dims": 2}, r"roi_size \(16, 16, 16\) has 3 entries but spatial_dims=2"),
        ({"spatial_dims": 4}, r"spatial_dims must be 2 or 3, got 4"),
        ({"roi_size": (16, 0, 16)}, r"roi_size must be positive, got \(16, 0, 16\)"),
        ({"a_min": 100.0, "a_max": -100.0}, r"a_min \(100.0\) must be below a_max \(-100.0\)"),
        ({"num_samples": 0}, r"num_samples must be an int >= 1, got 0"),
        ({"flip_prob": 1.5}, r"flip_prob must be in \[0, 1\], got 1.5"),
        ({"intensity_shift": -0.1}, r"intensity_shift must be a finite number >= 0, got -0.1"),
        ({"intensity_shift": float("inf")}, r"intensity_shift must be a finite number >= 0, got inf"),
        ({"intensity_scale": 1.0}, r"intensity_scale must be in \[0, 1\), got 1.0"),
        ({"keys": ("image", "label")}, r"contains 'label'; pass with_label=True"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_pretrain_transforms(**kwargs)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


@pytest.mark.parametrize("cache, cls", [("none", Dataset), ("cache", CacheDataset), ("persistent", PersistentDataset)])
def test_cache_modes_give_same_items(items, tmp_path, cache, cls):
    transform = get_pretrain_transforms("ct", roi_size=(16, 16, 16), pixdim=SPACING, train=False, with_label=True)
    reference = transform(items[0])
    ds = get_dataset(items, transform, cache=cache, cache_dir=tmp_path / "cache")
    assert type(ds) is cls and len(ds) == 2
    for _ in range(2):  # a second read comes from the cache for the cached kinds
        first = ds[0]
        torch.testing.assert_close(_plain(first["image"]), reference["image"].as_tensor())
        torch.testing.assert_close(_plain(first["label"]), reference["label"].as_tensor())
    # MetaTensor except from disk: PersistentDataset keeps MONAI's default track_meta=False
    assert isinstance(first["image"], MetaTensor) is (cache != "persistent")
    if cache == "persistent":
        (cached,) = (tmp_path / "cache").glob("*.pt")
        stamp = cached.stat().st_mtime_ns
        ds[0]
        assert cached.stat().st_mtime_ns == stamp  # read back, not recomputed


def test_persistent_cache_key_follows_transform_settings(items, tmp_path):
    """A changed intensity window in the same cache_dir is preprocessed again, not read from the old cache."""
    cache_dir = tmp_path / "cache"
    values = []
    for a_max in (250.0, 100.0, 250.0):
        transform = get_pretrain_transforms("ct", roi_size=(16, 16, 16), pixdim=SPACING, a_max=a_max, train=False)
        values.append(_plain(get_dataset(items[:1], transform, cache="persistent", cache_dir=cache_dir)[0]["image"]))
        expected = _plain(transform(items[0])["image"])
        torch.testing.assert_close(values[-1], expected)
    assert len(list(cache_dir.glob("*.pt"))) == 2  # one file per window; the third run read the first's
    assert not torch.equal(values[0], values[1])


def test_transform_hash_unpicklable_falls_back_to_names(caplog):
    from monai.transforms import Lambdad

    transforms = [Lambdad("image", lambda x: x + 1)]
    with caplog.at_level("WARNING"):
        first = transform_hash(transforms)
    assert "cannot be pickled" in caplog.text and "Lambdad" in caplog.text
    assert first == transform_hash([Lambdad("image", lambda x: x * 2)])  # names only: the settings go unnoticed
    assert transform_hash([Lambdad("image", print)]) != transform_hash(
        [Lambdad("image", len)]
    )  # picklable: settings count


def test_get_dataset_bad_arguments(items):
    with pytest.raises(ValueError, match=r"cache='disk' is not supported: .*persistent"):
        get_dataset(items, Compose([]), cache="disk")
    with pytest.raises(ValueError, match=r"cache='persistent' needs cache_dir"):
        get_dataset(items, Compose([]), cache="persistent")
    with pytest.raises(ValueError, match=r"cache_rate must be in \(0, 1\], got 0"):
        get_dataset(items, Compose([]), cache="cache", cache_rate=0)


REPO = Path(__file__).resolve().parents[1]


def test_presets(items):
    ct = load_data_preset("ct")
    assert ct == {"modality": "ct", "pixdim": [1.5, 1.5, 2.0], "a_min": -175.0, "a_max": 250.0, "num_samples": 2,
                  "flip_prob": 0.1}  # fmt: skip
    assert load_data_preset("data_ct") == ct
    assert load_data_preset("mri") == {"modality": "mri", "pixdim": [1.0, 1.0, 1.0], "num_samples": 2, "flip_prob": 0.1}
    kwargs = load_data_preset("ct", roi_size=(16, 16), spatial_dims=2, num_samples=3)
    out = _seeded(get_pretrain_transforms(**kwargs, train=True))(items[0])
    assert [tuple(s["image"].shape) for s in out] == [(1, 16, 16)] * 3


def test_preset_from_path_and_errors(tmp_path):
    good = tmp_path / "mine.json"
    good.write_text(json.dumps({"modality": "mri", "pixdim": None}))
    assert load_data_preset(good) == {"modality": "mri", "pixdim": None}
    assert load_data_preset(str(good), roi_size=32) == {"modality": "mri", "pixdim": None, "roi_size": 32}
    with pytest.raises(ValueError, match=r"unknown data preset 'pet'; available presets: \['ct', 'mri'\]"):
        load_data_preset("pet")
    with pytest.raises(ValueError, match=r"unknown data preset 'data_pet'; available presets: \['ct', 'mri'\]"):
        load_data_preset("data_pet")
    with pytest.raises(FileNotFoundError, match=r"data preset file .*nope\.json not found"):
        load_data_preset(tmp_path / "nope.json")
    bad_key = tmp_path / "bad_key.json"
    bad_key.write_text(json.dumps({"modality": "ct", "window": [0, 1]}))
    with pytest.raises(ValueError, match=r"bad_key\.json: unknown keys \['window'\] for get_pretrain_transforms"):
        load_data_preset(bad_key)
    with pytest.raises(ValueError, match=r"overrides: unknown keys \['roi'\]"):
        load_data_preset(good, roi=3)
    broken = tmp_path / "broken.json"
    broken.write_text('{"modality": "ct",\n}')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON at line 2, column 1"):
        load_data_preset(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json: a data preset must be a JSON object"):
        load_data_preset(listed)


def test_presets_ship_inside_the_package():
    """A wheel has no top-level ``configs/``: the presets live in ``monai_mae/data/presets`` (package data)."""
    packaged = importlib.resources.files("monai_mae.data") / "presets"
    assert sorted(e.name for e in packaged.iterdir() if e.name.endswith(".json")) == ["ct.json", "mri.json"]
    assert data_preset_names() == ["ct", "mri"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert (
        '"monai_mae.data.presets" = ["*.json"]' in pyproject
        and '"monai_mae.data.presets"' in pyproject.split("package-dir")[0]
    )


@pytest.mark.parametrize("name", ["ct", "mri"])
def test_top_level_preset_copies_match_the_packaged_ones(name):
    """``configs/data_<name>.json`` is the user-facing copy to edit; as shipped it must not disagree."""
    copy = REPO / "configs" / f"data_{name}.json"
    assert load_data_preset(copy) == load_data_preset(name)


def test_no_module_reads_files_outside_the_package():
    """Nothing in ``monai_mae/`` reaches above the package (``parents[...]``, ``../``): a wheel has only the package."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "monai_mae").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "parents[" in line or "../" in line or ".parent.parent" in line
    ]
    assert offenders == []
