"""Reconstruction and segmentation-overlay pictures (matplotlib + monai.visualize), and training without matplotlib."""

from __future__ import annotations

import importlib.util
import logging
import sys

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image

from monai_mae import patchify
from monai_mae.engines import ReconstructionSaver, SegmentationOverlaySaver, pictures
from monai_mae.engines.pictures import (
    overlay_slice,
    reconstruction_figure,
    render_figure,
    require_matplotlib,
    segmentation_overlay_figure,
)


class _Writer:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step, dataformats):
        self.images.append((tag, image.shape, step, dataformats))


def _recon_output(shape, patch):
    images = torch.rand(shape)
    pred = patchify(images, patch)
    mask = torch.zeros(pred.shape[:2])
    mask[:, ::2] = 1
    return {"image": images, "pred": (pred, mask)}


def _labels(shape=(24, 20, 12)):
    label = torch.zeros(1, *shape)
    label[0, 2:8, 3:9, 4:7] = 1
    label[0, 12:20, 10:18, 5:6] = 3  # slice z=5 holds the most labelled voxels
    return label


@pytest.mark.parametrize("shape, patch, size", [((2, 1, 16, 16, 8), (8, 8, 4), (1060, 790)),
                                                ((2, 1, 16, 24), (8, 8), (1060, 310))])  # fmt: skip
def test_reconstruction_saver_writes_png_and_tensorboard(tmp_path, shape, patch, size):
    writer = _Writer()
    saver = ReconstructionSaver(tmp_path, patch_size=patch, summary_writer=writer, a_min=-175.0, a_max=250.0)
    engine = Engine(lambda e, b: _recon_output(shape, patch))
    saver.attach(engine)
    engine.run([0, 1], max_epochs=2)
    for name in ("epoch_0001.png", "epoch_0002.png", "latest.png"):
        assert Image.open(tmp_path / "reconstructions" / name).size == size
    assert saver.last_path == tmp_path / "reconstructions" / "epoch_0002.png"
    assert writer.images == [("reconstruction", (size[1], size[0], 3), e, "HWC") for e in (1, 2)]


def test_reconstruction_figure_labels_hu_axes_and_columns():
    out = _recon_output((1, 1, 16, 16, 8), (8, 8, 4))
    figure = reconstruction_figure(out["image"], *out["pred"], (8, 8, 4), a_min=-175.0, a_max=250.0, title="epoch 3")
    *panels, bar = figure.axes
    assert bar.get_ylabel() == "HU" and bar.get_ylim() == pytest.approx((-175.0, 250.0))
    assert [ax.get_title() for ax in panels[:4]] == [
        "input",
        "masked input",
        "reconstruction",
        "reconstruction + visible",
    ]
    assert [panels[r * 4].get_ylabel() for r in range(3)] == [
        "axial\ny (voxel)",
        "coronal\nz (voxel)",
        "sagittal\nz (voxel)",
    ]
    assert panels[4].get_xlabel() == "x (voxel)" and figure.get_suptitle() == "epoch 3"
    # the input shown in HU: [0, 1] -> [a_min, a_max]
    shown = panels[0].images[-1].get_array()
    expected = out["image"][0, 0, :, :, 4].numpy().T * 425.0 - 175.0
    assert np.allclose(shown, expected, atol=1e-4)
    plain = reconstruction_figure(out["image"], *out["pred"], (8, 8, 4))
    assert plain.axes[-1].get_ylabel() == "intensity"
    with pytest.raises(ValueError, match="a_min and a_max go together"):
        reconstruction_figure(out["image"], *out["pred"], (8, 8, 4), a_min=-175.0)
    with pytest.raises(ValueError, match="a_min must be below a_max, got a_min=250.0, a_max=-175.0"):
        reconstruction_figure(out["image"], *out["pred"], (8, 8, 4), a_min=250.0, a_max=-175.0)


def test_overlay_slice():
    assert overlay_slice(_labels()[0].numpy()) == 5
    assert overlay_slice(np.zeros((4, 4, 9))) == 4


@pytest.mark.parametrize("decollated", [True, False])
def test_segmentation_overlay_saver(tmp_path, decollated):
    label = _labels()
    image = torch.rand(1, *label.shape[1:])
    pred = torch.nn.functional.one_hot(label[0].long(), 5).permute(3, 0, 1, 2).float()  # one-hot, as after AsDiscreted
    item = {"image": image, "label": pred.clone(), "pred": pred}
    output = [item] if decollated else {k: v[None] for k, v in item.items()}
    writer = _Writer()
    saver = SegmentationOverlaySaver(tmp_path, num_classes=5, class_names=["liver", "kidney", "spine", "lung"],
                                     summary_writer=writer, a_min=-175.0, a_max=250.0)  # fmt: skip
    engine = Engine(lambda e, b: output)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    assert Image.open(tmp_path / "overlays" / "epoch_0001.png").size == (1060, 380)
    assert (tmp_path / "overlays" / "latest.png").exists()
    assert writer.images == [("overlay", (380, 1060, 3), 1, "HWC")]


def test_segmentation_overlay_figure_colours_legend_and_errors():
    label = _labels()
    image = torch.rand(1, *label.shape[1:])
    figure = segmentation_overlay_figure(image, label, label, class_names=["a", "b", "c"])  # num_classes from labels: 4
    assert [t.get_text() for t in figure.axes[2].get_legend().get_texts()] == ["a", "b", "c"]
    assert figure.get_suptitle() == "axial slice z=5"
    assert [ax.get_title() for ax in figure.axes[:3]] == ["image", "label", "prediction"]
    rgb = figure.axes[1].images[-1].get_array()  # (y, x, 3) at z=5: class 3 at x 12..19, y 10..17
    from matplotlib import colormaps

    colour = np.array(colormaps["hsv"](3 / 4)[:3])
    z5 = image[0, ..., 5]
    grey = ((z5[14, 12] - z5.min()) / (z5.max() - z5.min())).item()
    assert np.allclose(rgb[12, 14], 0.5 * grey + 0.5 * colour, atol=1e-5)  # alpha 0.5 blend
    # no CT window given: the slice is min-max scaled; background shows it in grey only
    assert np.allclose(rgb[0, 0], ((z5[0, 0] - z5.min()) / (z5.max() - z5.min())).item(), atol=1e-6)
    with pytest.raises(ValueError, match=r"class_names must name the 4 foreground classes, got 2"):
        segmentation_overlay_figure(image, label, label, num_classes=5, class_names=["a", "b"])
    with pytest.raises(
        ValueError, match=r"must share their spatial shape, got \(24, 20, 12\), \(24, 20, 12\) and \(24, 20, 11\)"
    ):
        segmentation_overlay_figure(image, label, label[..., :11])
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got 0.0"):
        segmentation_overlay_figure(image, label, label, alpha=0.0)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2, got 1"):
        SegmentationOverlaySaver(".", num_classes=1)
    saver = SegmentationOverlaySaver(".")
    engine = Engine(lambda e, b: [{"image": image, "pred": label}])
    saver.attach(engine)
    with pytest.raises(ValueError, match=r"the evaluator's output has no \['label'\]"):
        engine.run([0], max_epochs=1)


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make every ``import matplotlib...`` fail, as when the package is not installed."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_without_matplotlib_training_goes_on_with_one_warning(tmp_path, no_matplotlib, caplog):
    with pytest.raises(ImportError, match=r"pip install 'monai-mae\[plots\]'"):
        require_matplotlib()
    out = _recon_output((1, 1, 16, 16, 8), (8, 8, 4))
    with pytest.raises(ImportError, match=r"monai-mae\[plots\]"):
        render_figure(object())
    saver = ReconstructionSaver(tmp_path, patch_size=(8, 8, 4))
    engine = Engine(lambda e, b: out)
    saver.attach(engine)
    with caplog.at_level(logging.WARNING):
        state = engine.run([0, 1], max_epochs=3)
    assert state.epoch == 3 and not (tmp_path / "reconstructions").exists() and saver.last_path is None
    warnings = [r.getMessage() for r in caplog.records if "ReconstructionSaver" in r.getMessage()]
    assert (
        len(warnings) == 1 and "training goes on without pictures" in warnings[0] and "monai-mae[plots]" in warnings[0]
    )


def test_pillow_is_imported_only_where_pictures_are_written(monkeypatch, tmp_path):
    """pillow is no dependency of its own (matplotlib, the plots extra, brings it): the module loads without it."""
    for name in [n for n in sys.modules if n == "PIL" or n.startswith("PIL.")] + ["PIL"]:
        monkeypatch.setitem(sys.modules, name, None)
    spec = importlib.util.spec_from_file_location("pictures_without_pillow", pictures.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no top-level PIL import
    saver = module.ReconstructionSaver(tmp_path, patch_size=(8, 8, 4))
    with pytest.raises(ImportError):
        saver._write(np.zeros((4, 4, 3), np.uint8), 1)
