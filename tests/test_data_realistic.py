"""Tests of the realistic phantom style (monai_mae.data.realistic, make_phantom(style="realistic"), the writer)."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest

from monai_mae.data import REALISTIC_ORGANS, make_realistic_phantom, realistic_spacing
from monai_mae.data.synthetic import ORGAN_TYPES, STYLES, make_phantom, write_synthetic_dataset

SHAPE = (96, 96, 32)
SMALL = (48, 48, 16)
# expected mean HU of each organ's interior (partial-volume rim removed), default contrast
BANDS = {
    "liver": (45.0, 80.0),
    "kidney": (15.0, 50.0),
    "bone": (150.0, 700.0),
    "lung": (-900.0, -700.0),
    "spleen": (30.0, 65.0),
    "pancreas": (15.0, 65.0),
    "aorta": (20.0, 65.0),
    "gallbladder": (-10.0, 30.0),
}


def _shift_all(mask: np.ndarray, combine) -> np.ndarray:
    """``mask`` combined with its six one-voxel shifts (edges wrap; the phantoms have air at the edges)."""
    out = mask.copy()
    for axis in range(3):
        for step in (1, -1):
            out = combine(out, np.roll(mask, step, axis=axis))
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    return _shift_all(mask, np.logical_and)


def _dilate(mask: np.ndarray) -> np.ndarray:
    return _shift_all(mask, np.logical_or)


@pytest.fixture(scope="module", params=[0, 1, 2])
def phantom(request):
    seed = request.param
    image, label = make_realistic_phantom(SHAPE, seed=seed, num_organs=9)
    return seed, image, label


def test_first_organs_are_the_simple_styles_organs():
    assert REALISTIC_ORGANS[: len(ORGAN_TYPES)] == tuple(name for name, *_ in ORGAN_TYPES)
    assert len(REALISTIC_ORGANS) == 9 and STYLES == ("simple", "realistic")


def test_shape_dtype_and_every_labelled_organ_present(phantom):
    _, image, label = phantom
    assert image.shape == SHAPE == label.shape
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == set(range(10))
    assert image.min() >= -1024.0 and image.max() <= 3071.0


def test_organ_mean_hu_in_their_bands(phantom):
    _, image, label = phantom
    for k, name in enumerate(REALISTIC_ORGANS, start=1):
        if name in BANDS:
            inside = _erode(label == k)
            assert inside.sum() > 0, name
            low, high = BANDS[name]
            assert low < image[inside].mean() < high, (name, image[inside].mean())
    stomach = image[label == 7]
    assert stomach.min() < -500.0 < stomach.max()  # the stomach holds gas as well as wall and fluid


def test_organs_are_small_fractions_of_the_volume(phantom):
    _, _, label = phantom
    fraction = {name: float((label == k).mean()) for k, name in enumerate(REALISTIC_ORGANS, start=1)}
    assert 0.02 < fraction["liver"] < 0.08
    assert all(0.0005 < fraction[name] < 0.012 for name in ("kidney", "spleen", "pancreas", "aorta", "gallbladder"))
    assert float((label > 0).mean()) < 0.2


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of True in a 1D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def test_air_outside_the_body_and_a_table_below_it(phantom):
    _, image, _ = phantom
    nx, ny, _ = image.shape
    assert np.all(image[:, -2:, :] < -900.0)  # anterior edge of the field of view: air
    assert np.all(image[:2, ny // 2 :, :] < -900.0) and np.all(image[-2:, ny // 2 :, :] < -900.0)  # beside the body
    profile = image[nx // 2 - 2 : nx // 2 + 3].mean(axis=0)  # (y, z): mid-sagittal band, posterior to anterior
    for z in range(image.shape[2]):
        runs = _runs(profile[:, z] > -500.0)  # the table, then the body (split where gas crosses the midline)
        (table_lo, table_hi), body_lo, body_hi = runs[0], runs[1][0], runs[-1][1]
        assert profile[table_lo:table_hi, z].max() > 100.0  # a dense plate
        assert profile[table_hi:body_lo, z].min() < -900.0  # air between them
        assert body_hi - body_lo > 0.4 * ny and table_hi - table_lo < 0.1 * ny


def test_noise_has_the_requested_amplitude_and_leaves_the_anatomy_alone():
    quiet_image, quiet_label = make_realistic_phantom(SMALL, seed=4, noise_hu=0.0)
    for noise_hu in (15.0, 25.0):
        image, label = make_realistic_phantom(SMALL, seed=4, noise_hu=noise_hu)
        np.testing.assert_array_equal(label, quiet_label)
        tissue = (quiet_image > -300.0) & (quiet_image < 300.0)
        assert abs(float((image - quiet_image)[tissue].std()) / noise_hu - 1.0) < 0.1
    _, label = make_realistic_phantom(SMALL, seed=4, bias_hu=30.0, contrast=0.5)
    np.testing.assert_array_equal(label, quiet_label)


def test_soft_tissue_noise_in_the_liver_is_ct_like(phantom):
    _, image, label = phantom
    assert 10.0 < image[_erode(label == 1)].std() < 25.0


def test_noise_is_spatially_correlated():
    quiet, _ = make_realistic_phantom(SMALL, seed=5, noise_hu=0.0)
    noise = make_realistic_phantom(SMALL, seed=5)[0] - quiet
    inside = noise[8:-8, 8:-8, :]
    neighbour = np.corrcoef(inside[:-1].ravel(), inside[1:].ravel())[0, 1]
    assert 0.3 < neighbour < 0.95  # in-plane correlated, not white


def test_lower_contrast_pulls_organs_together():
    means = {}
    for contrast in (1.0, 0.3):
        image, label = make_realistic_phantom(SHAPE, seed=6, num_organs=9, contrast=contrast, noise_hu=0, bias_hu=0)
        means[contrast] = {k: float(image[_erode(label == k)].mean()) for k in (1, 5, 9)}  # liver, spleen, gallbladder
    assert means[1.0][1] - means[1.0][9] > 30.0  # liver vs gallbladder
    assert means[0.3][1] - means[0.3][9] < 0.5 * (means[1.0][1] - means[1.0][9])


def test_organs_touch_tissue_of_similar_hu(phantom):
    _, image, label = phantom
    liver = label == 1
    rim = _dilate(liver) & ~liver
    assert set(np.unique(label[rim]).tolist()) & {2, 5, 6, 7, 8, 9}  # another labelled organ touches the liver
    unlabelled = rim & (label == 0)
    soft = (image[unlabelled] > -20.0) & (image[unlabelled] < 120.0)  # muscle wall, vena cava, bowel, diaphragm
    assert soft.mean() > 0.3


def test_partial_volume_edges():
    image, label = make_realistic_phantom(SHAPE, seed=1, noise_hu=0.0, bias_hu=0.0)
    lung = (label == 4) & (image > -700.0) & (image < -100.0)  # voxels between lung and soft tissue
    assert lung.sum() > 100


def test_deterministic_for_a_seed_and_different_between_seeds():
    first = make_realistic_phantom(SMALL, seed=7, num_organs=9)
    again = make_phantom(SMALL, seed=7, num_organs=9, style="realistic")
    other = make_realistic_phantom(SMALL, seed=8, num_organs=9)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[1], other[1])
    overlap = np.logical_and(first[1] == 1, other[1] == 1).sum() / (first[1] == 1).sum()
    assert 0.5 < overlap < 0.98  # the liver moves and changes shape, but stays where livers are


@pytest.mark.parametrize("num_organs", [0, 1, 5])
def test_num_organs_selects_the_labels_only(num_organs):
    image, label = make_realistic_phantom(SMALL, seed=2, num_organs=num_organs)
    full_image, full_label = make_realistic_phantom(SMALL, seed=2, num_organs=9)
    np.testing.assert_array_equal(image, full_image)  # the anatomy is the same
    np.testing.assert_array_equal(label, np.where(full_label <= num_organs, full_label, 0))


def test_realistic_spacing():
    assert realistic_spacing((512, 512, 96)) == pytest.approx((0.7673, 0.7673, 2.9167), abs=1e-4)
    assert realistic_spacing((128, 128, 48)) == pytest.approx((3.0692, 3.0692, 5.8333), abs=1e-4)


def test_writer_header_spacing_labels_and_description(tmp_path):
    shape, spacing = (48, 48, 16), (1.6, 1.6, 3.0)
    options = dict(shape=shape, spacing=spacing, seed=3, num_organs=9, style="realistic", noise_hu=20.0)
    path = write_synthetic_dataset(tmp_path / "a", num=2, num_validation=1, **options)
    datalist = json.loads(path.read_text())
    assert datalist["labels"] == {"0": "background", **{str(k): n for k, n in enumerate(REALISTIC_ORGANS, 1)}}
    assert "realistic style, noise_hu 20.0" in datalist["description"]
    seeds = np.random.SeedSequence(3).generate_state(2)
    for i, entry in enumerate(datalist["training"] + datalist["validation"]):
        img, lab = nib.load(path.parent / entry["image"]), nib.load(path.parent / entry["label"])
        for nii in (img, lab):
            assert nii.shape == shape
            np.testing.assert_allclose(nii.header.get_zooms(), spacing)
            np.testing.assert_allclose(np.diag(nii.affine)[:3], spacing)
            assert nib.aff2axcodes(nii.affine) == ("R", "A", "S")
        image, label = make_realistic_phantom(shape, seed=int(seeds[i]), num_organs=9, noise_hu=20.0)
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.round(image).astype(np.int16))
        np.testing.assert_array_equal(np.asanyarray(lab.dataobj), label)
    default = write_synthetic_dataset(tmp_path / "b", num=1, num_validation=0, shape=shape, style="realistic")
    zooms = nib.load(default.parent / "imagesTr/phantom_000.nii.gz").header.get_zooms()
    np.testing.assert_allclose(zooms, realistic_spacing(shape), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"style": "ct"}, r"style must be one of \('simple', 'realistic'\), got 'ct'"),
        ({"style": "realistic", "num_organs": 10}, r"num_organs must be an int in 0..9 for style='realistic', got 10"),
        ({"style": "realistic", "contrast": 3.0}, r"contrast must be a number in \[0.0, 2.0\], got 3.0"),
        ({"style": "realistic", "noise_hu": -1.0}, r"noise_hu must be a number in \[0.0, 200.0\], got -1.0"),
        ({"style": "realistic", "bias_hu": float("nan")}, r"bias_hu must be a number in \[0.0, 200.0\], got nan"),
        ({"style": "realistic", "shape": (12, 48, 16)}, r"shape must be 3 ints, each >= 16 for style='realistic'"),
        ({"style": "realistic", "layout": "random"}, r"layout='random' does not apply to style='realistic'"),
        ({"noise_hu": 20.0}, r"noise_hu=20.0: only style='realistic' takes these"),
        ({"contrast": 0.5, "bias_hu": 3.0}, r"contrast=0.5, bias_hu=3.0: only style='realistic' takes these"),
    ],
)
def test_bad_options_name_themselves(tmp_path, kwargs, match):
    kwargs = {"shape": SMALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_phantom(**kwargs)
    with pytest.raises(ValueError, match=match):
        write_synthetic_dataset(tmp_path / "ds", num=1, num_validation=0, **kwargs)
    assert not (tmp_path / "ds" / "datalist.json").exists()


def test_anatomical_layout_is_accepted_and_the_same():
    a = make_phantom(SMALL, seed=1, style="realistic")
    b = make_phantom(SMALL, seed=1, layout="anatomical", style="realistic")
    np.testing.assert_array_equal(a[0], b[0])
    assert re.search("upper-abdomen", make_realistic_phantom.__doc__ or "")
