"""The small factories the bundle configs call instead of inline ``$... if ... else ...`` expressions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ignite.handlers import ProgressBar
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from monai.inferers import SliceInferer, SlidingWindowInferer
from monai.transforms import Identityd, NormalizeIntensityd, ScaleIntensityRanged

from monai_mae.data import intensity_transform, load_checked_datalist, load_data_preset, write_synthetic_dataset
from monai_mae.engines import (
    GradientClipping,
    LearningRateLogger,
    ensure_training_data,
    first_enabled,
    rank_zero_handlers,
    window_inferer,
)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_synthetic_dataset(root, num=2, num_validation=1, shape=(16, 16, 8), num_organs=2)
    return root


@pytest.mark.parametrize("parts, chosen", [((None, "b"), "b"), (("a", "b"), "a"), ((0, None), 0), (([], "b"), [])])
def test_first_enabled_takes_the_first_part_that_is_not_none(parts, chosen):
    assert first_enabled(*parts) == chosen


def test_first_enabled_refuses_when_every_part_is_disabled():
    with pytest.raises(ValueError, match="every one of the 2 parts is disabled"):
        first_enabled(None, None)


def test_checked_datalist_is_empty_with_a_preprocessed_dir_and_reads_nothing(tmp_path):
    assert load_checked_datalist(tmp_path / "absent", "training", preprocessed_dir="/data/pre") == []


def test_checked_datalist_loads_and_checks_the_files(phantoms, tmp_path):
    items = load_checked_datalist(phantoms, "validation", require_label=True, check={"keys": ["image", "label"]})
    assert [item["image"].rsplit("/", 1)[-1] for item in items] == ["phantom_001.nii.gz"]  # phantoms 0-1: training
    assert load_checked_datalist(phantoms, "training", preprocessed_dir="  ") == load_checked_datalist(phantoms)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.nii.gz").write_bytes(b"not a volume")
    (broken / "datalist.json").write_text(json.dumps({"training": [{"image": "bad.nii.gz"}]}))
    assert len(load_checked_datalist(broken)) == 1  # no check: the entry is only listed
    with pytest.raises(ValueError, match="bad.nii.gz"):
        load_checked_datalist(broken, check={"keys": ["image"]})


def test_ensure_training_data_checks_the_folder_or_the_dataset(phantoms, tmp_path):
    assert ensure_training_data(phantoms) == phantoms / "datalist.json"
    assert ensure_training_data(tmp_path / "other", rank=1) is None  # ranks > 0 wait for rank 0
    assert not (tmp_path / "other").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ensure_training_data(tmp_path / "other")
    made = ensure_training_data(tmp_path / "made", synthetic_if_missing=True)
    assert made == tmp_path / "made" / "datalist.json" and made.is_file()
    with pytest.raises(FileNotFoundError, match="manifest.json"):  # the folder is checked, the dataset is not read
        ensure_training_data(tmp_path / "absent", preprocessed_dir=tmp_path / "pre", preset=load_data_preset("ct"))
    with pytest.raises(ValueError, match="preprocessed_dir='/data/pre' needs the run's preset"):
        ensure_training_data(tmp_path / "absent", preprocessed_dir="/data/pre")


@pytest.mark.parametrize("rank, kept", [(0, 5), (1, 1), (None, 5)])
def test_rank_zero_handlers_keep_the_logging_handlers_on_rank_zero_only(rank, kept):
    clip = GradientClipping(max_norm=1.0)
    handlers = [
        StatsHandler(),
        TensorBoardStatsHandler(summary_writer=object()),
        clip,
        LearningRateLogger(summary_writer=object(), optimizer=None),
        ProgressBar(),
    ]
    chosen = rank_zero_handlers(handlers, rank=rank)
    assert len(chosen) == kept and clip in chosen


@pytest.mark.parametrize("spatial_dims, kind", [(2, SliceInferer), (3, SlidingWindowInferer)])
def test_window_inferer_by_spatial_dims(spatial_dims, kind):
    inferer = window_inferer([8] * spatial_dims, spatial_dims, sw_batch_size=2)
    assert type(inferer) is kind and inferer.sw_batch_size == 2
    image = torch.rand(1, 1, 8, 12, 5)
    assert inferer(image, lambda x: x * 2).shape == image.shape


def test_window_inferer_refuses_other_dims():
    with pytest.raises(ValueError, match="spatial_dims=4: expected 2 or 3"):
        window_inferer([8] * 4, 4)


def test_intensity_transform_windows_ct_and_normalises_mri():
    ct = {"modality": "ct", "a_min": -175.0, "a_max": 250.0}
    forward, back = intensity_transform(ct), intensity_transform(ct, "pred", invert=True)
    assert isinstance(forward, ScaleIntensityRanged) and isinstance(back, ScaleIntensityRanged)
    values = np.array([-500.0, -175.0, 37.5, 250.0, 600.0])
    scaled = np.asarray(forward({"image": values})["image"])
    np.testing.assert_allclose(scaled, [0.0, 0.0, 0.5, 1.0, 1.0])  # clipped to the window
    np.testing.assert_allclose(np.asarray(back({"pred": np.array([0.0, 0.5, 2.0])})["pred"]), [-175.0, 37.5, 675.0])
    assert isinstance(intensity_transform({"modality": "mri"}), NormalizeIntensityd)
    assert isinstance(intensity_transform({"modality": "mri"}, "pred", invert=True), Identityd)
    with pytest.raises(ValueError, match="pet"):
        intensity_transform({"modality": "pet"})
