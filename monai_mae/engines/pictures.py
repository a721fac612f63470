"""Pictures for watching a run: MAE reconstructions during pretraining and segmentation overlays
during fine-tuning validation, drawn with matplotlib and ``monai.visualize``.

matplotlib is optional (``pip install monai-mae[plots]``). Without it the drawing functions raise an
``ImportError`` naming that command, and the handlers log one warning and let training go on without
pictures. The handlers write PNGs on rank 0 (with pillow, which matplotlib requires, so it is imported
only there) and, given a ``summary_writer``, the same picture to TensorBoard.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from monai_mae.networks.display import masked_input, reconstruct_image
from monai_mae.utils import is_main_process

__all__ = [
    "RECONSTRUCTION_COLUMNS",
    "require_matplotlib",
    "render_figure",
    "reconstruction_views",
    "reconstruction_figure",
    "reconstruction_panel",
    "overlay_slice",
    "segmentation_overlay_figure",
    "ReconstructionSaver",
    "SegmentationOverlaySaver",
]

RECONSTRUCTION_COLUMNS = ("input", "masked input", "reconstruction", "reconstruction + visible")
PLOTS_HINT = "pip install 'monai-mae[plots]'"
# (title, horizontal axis, vertical axis) of the mid-slices of a (x, y, z) volume, and of a 2D image
_VIEWS_3D = (("axial", "x", "y"), ("coronal", "x", "z"), ("sagittal", "y", "z"))
_VIEW_2D = (("image", "x", "y"),)
_FONT = 9


def require_matplotlib() -> tuple[Any, Any]:
    """matplotlib's ``Figure`` and Agg canvas classes (no pyplot state, safe without a display).

    Raises:
        ImportError: when matplotlib is not installed, naming ``pip install 'monai-mae[plots]'``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"monai_mae pictures need matplotlib, which is not installed: {PLOTS_HINT}") from err
    return Figure, FigureCanvasAgg


def render_figure(figure: Any) -> np.ndarray:
    """The pixels of a matplotlib figure as an ``(H, W, 3)`` uint8 array (``H, W`` = size in inches x dpi)."""
    _, canvas_cls = require_matplotlib()
    canvas = canvas_cls(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _slices(volume: np.ndarray) -> list[np.ndarray]:
    """The mid-slices of an ``(x, y, z)`` volume (axial, coronal, sagittal) or the ``(x, y)`` image itself,
    transposed for display (rows = the vertical axis, drawn with ``origin="lower"``)."""
    if volume.ndim == 2:
        return [volume.T]
    mid = [s // 2 for s in volume.shape]
    return [volume[:, :, mid[2]].T, volume[:, mid[1], :].T, volume[mid[0], :, :].T]


def reconstruction_views(
    images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: Sequence[int], norm_pix_loss: bool = False
) -> list[list[np.ndarray]]:
    """The 2D pictures of the first sample's first channel, as ``views[row][column]``.

    Columns are :data:`RECONSTRUCTION_COLUMNS` (input, masked input, reconstruction, reconstruction with
    the visible patches pasted back); rows the axial, coronal and sagittal mid-slices (3D) or the image
    (2D). Each picture is transposed for display: rows run along the second in-plane axis.

    Args:
        images: ``(B, C, *S)``.
        pred: ``(B, N, prod(P) * C)``.
        mask: ``(B, N)``, 1 = masked.
        patch_size: per-axis patch size.
        norm_pix_loss: whether ``pred`` is per-patch normalised.
    """
    images, pred, mask = images[:1].detach().float().cpu(), pred[:1].detach().float().cpu(), mask[:1].detach().cpu()
    columns = [
        images,
        masked_input(images, mask, patch_size, fill=float(images.min())),
        reconstruct_image(pred, mask, images, patch_size, norm_pix_loss=norm_pix_loss),
        reconstruct_image(pred, mask, images, patch_size, norm_pix_loss=norm_pix_loss, paste_visible=True),
    ]
    per_column = [_slices(c[0, 0].numpy()) for c in columns]
    return [[column[r] for column in per_column] for r in range(len(per_column[0]))]


def _check_window(a_min: float | None, a_max: float | None) -> None:
    if (a_min is None) != (a_max is None):
        raise ValueError(f"a_min and a_max go together (the CT window in HU), got a_min={a_min}, a_max={a_max}.")
    if a_min is not None and not a_min < a_max:
        raise ValueError(f"a_min must be below a_max, got a_min={a_min}, a_max={a_max}.")


def _draw(ax: Any, picture: np.ndarray, vmin: float, vmax: float, xlabel: str, ylabel: str, **kwargs: Any) -> Any:
    """One 2D picture ``(rows, cols)``, or RGB ``(3, rows, cols)``, on ``ax`` through ``monai.visualize.matshow3d``,
    with the axes labelled in voxels."""
    from monai.visualize import matshow3d

    if picture.ndim == 3:  # RGB: one frame with its channel first
        kwargs.update(channel_dim=0, frame_dim=-1)
        picture = picture[..., None]
    matshow3d(picture, fig=ax, vmin=vmin, vmax=vmax, margin=0, origin="lower", **kwargs)
    ax.axis("on")
    ax.xaxis.set_ticks_position("bottom")
    ax.set_xlabel(f"{xlabel} (voxel)", fontsize=_FONT)
    ax.set_ylabel(f"{ylabel} (voxel)", fontsize=_FONT)
    ax.tick_params(labelsize=_FONT - 1)
    return ax.images[-1]


def reconstruction_figure(
    images: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: Sequence[int],
    norm_pix_loss: bool = False,
    a_min: float | None = None,
    a_max: float | None = None,
    title: str | None = None,
    panel_inches: float = 2.4,
    dpi: int = 100,
) -> Any:
    """A matplotlib figure of :func:`reconstruction_views`: one column per stage, one row per view.

    Every panel shares one grey scale with a colour bar: in HU when the CT window ``a_min..a_max`` that
    scaled the images to [0, 1] is given, else in the images' own units (the input's range). The figure
    is ``(4 * panel_inches + 1.0) x (rows * panel_inches + 0.7)`` inches at ``dpi``.

    Args:
        images, pred, mask, patch_size, norm_pix_loss: as for :func:`reconstruction_views`.
        a_min: HU mapped to 0 by the CT window. Defaults to None (no HU scale).
        a_max: HU mapped to 1. Given together with ``a_min``.
        title: figure title. Defaults to None.
        panel_inches: size of one panel. Defaults to 2.4.
        dpi: pixels per inch. Defaults to 100.

    Raises:
        ImportError: without matplotlib (``pip install 'monai-mae[plots]'``).
        ValueError: for a half-given or empty CT window.
    """
    _check_window(a_min, a_max)
    figure_cls, _ = require_matplotlib()
    views = reconstruction_views(images, pred, mask, patch_size, norm_pix_loss)
    names = _VIEW_2D if len(views) == 1 else _VIEWS_3D
    if a_min is not None:
        views = [[v * (a_max - a_min) + a_min for v in row] for row in views]
        vmin, vmax, unit = float(a_min), float(a_max), "HU"
    else:
        vmin, vmax, unit = float(views[0][0].min()), float(views[0][0].max()), "intensity"
    rows, cols = len(views), len(RECONSTRUCTION_COLUMNS)
    figure = figure_cls(figsize=(cols * panel_inches + 1.0, rows * panel_inches + 0.7), dpi=dpi, layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    shown = None
    for r, (row, (view, horizontal, vertical)) in enumerate(zip(views, names)):
        for c, picture in enumerate(row):
            shown = _draw(axes[r][c], picture, vmin, vmax, horizontal, vertical, cmap="gray")
            if r == 0:
                axes[r][c].set_title(RECONSTRUCTION_COLUMNS[c], fontsize=_FONT + 1)
        axes[r][0].set_ylabel(f"{view}\n{vertical} (voxel)", fontsize=_FONT)
    bar = figure.colorbar(shown, ax=axes, shrink=0.8)
    bar.set_label(unit, fontsize=_FONT)
    bar.ax.tick_params(labelsize=_FONT - 1)
    if title:
        figure.suptitle(title, fontsize=_FONT + 2)
    return figure


def reconstruction_panel(
    images: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: Sequence[int],
    norm_pix_loss: bool = False,
    **kwargs: Any,
) -> np.ndarray:
    """:func:`reconstruction_figure` rendered to an ``(H, W, 3)`` uint8 array (kwargs go to it)."""
    return render_figure(reconstruction_figure(images, pred, mask, patch_size, norm_pix_loss, **kwargs))


def overlay_slice(label: np.ndarray) -> int:
    """The index along the last axis of a 3D ``(x, y, z)`` label map with the most foreground voxels
    (the middle one when there is none)."""
    counts = (label > 0).reshape(-1, label.shape[-1]).sum(0)
    return int(np.argmax(counts)) if counts.any() else label.shape[-1] // 2


def _as_labels(array: torch.Tensor | np.ndarray) -> np.ndarray:
    """Channel-first ``(K, *S)`` one-hot or scores -> argmax; ``(1, *S)`` labels -> int labels ``(*S)``."""
    array = array.detach().float().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    return array.argmax(0) if array.shape[0] > 1 else np.rint(array[0]).astype(np.int64)


def segmentation_overlay_figure(
    image: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    pred: torch.Tensor | np.ndarray,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    a_min: float | None = None,
    a_max: float | None = None,
    alpha: float = 0.5,
    title: str | None = None,
    panel_inches: float = 3.0,
    dpi: int = 100,
) -> Any:
    """Image, image + label and image + prediction of one case, overlays by ``monai.visualize.blend_images``.

    3D volumes are shown at the axial slice with the most labelled voxels (:func:`overlay_slice`).
    Class ``c`` has the colour ``hsv(c / num_classes)`` in both overlays, named in a legend; background
    is transparent. The figure is ``(3 * panel_inches + 1.6) x (panel_inches + 0.8)`` inches at ``dpi``.

    Args:
        image: ``(C, *S)``, first channel shown; in [0, 1] when ``a_min``/``a_max`` are given.
        label: ``(1, *S)`` labels or ``(K, *S)`` one-hot.
        pred: the same forms as ``label`` (``(K, *S)`` scores are arg-maxed).
        num_classes: classes including background. Defaults to ``K`` of a one-hot input, else the
            largest label + 1.
        class_names: names of classes 1..num_classes-1 for the legend. Defaults to ``class_N``.
        a_min, a_max: the CT window (HU) that scaled the image to [0, 1]; labels the colour bar in HU.
        alpha: label opacity. Defaults to 0.5.
        title: figure title. Defaults to None.
        panel_inches: size of one panel. Defaults to 3.0.
        dpi: pixels per inch. Defaults to 100.

    Raises:
        ImportError: without matplotlib (``pip install 'monai-mae[plots]'``).
        ValueError: for mismatched spatial shapes, a bad ``num_classes``/``class_names``/``alpha`` or CT window.
    """
    _check_window(a_min, a_max)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}.")
    figure_cls, _ = require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.patches import Patch
    from monai.visualize import blend_images

    image = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    grey = image[0]
    labels, preds = _as_labels(label), _as_labels(pred)
    if not grey.shape == labels.shape == preds.shape:
        raise ValueError(
            f"image, label and pred must share their spatial shape, got {grey.shape}, {labels.shape} and {preds.shape}."
        )
    if num_classes is None:
        one_hot = [a.shape[0] for a in (label, pred) if a.shape[0] > 1]
        num_classes = one_hot[0] if one_hot else int(max(labels.max(), preds.max())) + 1
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background and one class), got {num_classes}.")
    names = list(class_names) if class_names is not None else [f"class_{c}" for c in range(1, num_classes)]
    if len(names) != num_classes - 1:
        raise ValueError(f"class_names must name the {num_classes - 1} foreground classes, got {len(names)}: {names}.")
    where = ""
    if grey.ndim == 3:
        z = overlay_slice(labels)
        grey, labels, preds, where = grey[..., z], labels[..., z], preds[..., z], f"axial slice z={z}"
    if a_min is not None:
        shown = np.clip(grey, 0.0, 1.0)
    else:
        low, high = float(grey.min()), float(grey.max())
        shown = (grey - low) / max(high - low, 1e-8)
    overlays = [
        blend_images(shown[None], (lab[None] / num_classes).astype(np.float32), alpha=alpha, rescale_arrays=False)
        for lab in (labels, preds)
    ]  # (3, x, y) each
    figure = figure_cls(figsize=(3 * panel_inches + 1.6, panel_inches + 0.8), dpi=dpi, layout="constrained")
    axes = figure.subplots(1, 3, squeeze=False)[0]
    if a_min is not None:
        vmin, vmax, unit, grey_shown = float(a_min), float(a_max), "HU", shown * (a_max - a_min) + a_min
    else:
        vmin, vmax, unit, grey_shown = float(grey.min()), float(grey.max()), "intensity", grey
    base = _draw(axes[0], grey_shown.T, vmin, vmax, "x", "y", cmap="gray")
    for ax, rgb in zip(axes[1:], overlays):
        _draw(ax, rgb.transpose(0, 2, 1), 0.0, 1.0, "x", "y")
    for ax, name in zip(axes, ("image", "label", "prediction")):
        ax.set_title(name, fontsize=_FONT + 1)
    bar = figure.colorbar(base, ax=axes[0], shrink=0.8)
    bar.set_label(unit, fontsize=_FONT)
    bar.ax.tick_params(labelsize=_FONT - 1)
    cmap = colormaps["hsv"]
    handles = [Patch(color=cmap(c / num_classes), label=names[c - 1]) for c in range(1, num_classes)]
    axes[2].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=_FONT - 1, frameon=False)
    heading = ", ".join(t for t in (title, where) if t)
    if heading:
        figure.suptitle(heading, fontsize=_FONT + 2)
    return figure


class _PictureSaver:
    """Writes a rendered picture to ``{output_dir}/{folder}/epoch_NNNN.png`` and ``latest.png`` (rank 0)
    and to TensorBoard; without matplotlib it warns once and does nothing.

    Attached to an engine, it keeps the first batch of each epoch (``_keep_first``, per subclass) and
    draws it when the epoch completes (``__call__``).
    """

    folder_name = ""
    tag = ""

    def __init__(self, output_dir: str | os.PathLike, summary_writer: Any | None, dpi: int) -> None:
        if not isinstance(dpi, int) or dpi < 10:
            raise ValueError(f"dpi must be an int >= 10, got {dpi!r}.")
        self.folder = Path(output_dir) / self.folder_name
        self.summary_writer = summary_writer
        self.dpi = dpi
        self.last_path: Path | None = None
        self._warned = False
        self._first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._first = None

    def _keep_first(self, engine: Engine) -> None:
        raise NotImplementedError

    def _available(self) -> bool:
        try:
            require_matplotlib()
        except ImportError as err:
            if not self._warned:
                self.logger.warning(f"{type(self).__name__}: {err}; training goes on without pictures.")
                self._warned = True
            return False
        return True

    def _write(self, picture: np.ndarray, epoch: int) -> None:
        from PIL import Image  # a matplotlib dependency: present whenever pictures are drawn

        self.folder.mkdir(parents=True, exist_ok=True)
        self.last_path = self.folder / f"epoch_{epoch:04d}.png"
        Image.fromarray(picture).save(self.last_path)
        Image.fromarray(picture).save(self.folder / "latest.png")
        if self.summary_writer is not None:
            self.summary_writer.add_image(self.tag, picture, epoch, dataformats="HWC")


class ReconstructionSaver(_PictureSaver):
    """Save a reconstruction picture (:func:`reconstruction_figure`) of the first validation sample after
    each validation.

    Writes ``{output_dir}/reconstructions/epoch_NNNN.png`` (and ``latest.png``) and, with a
    ``summary_writer``, the TensorBoard image ``reconstruction``. Attach to the evaluator; the epoch is
    the trainer's. Without matplotlib, one warning and no pictures.

    Args:
        output_dir: where the ``reconstructions`` folder goes.
        patch_size: the network's patch size.
        norm_pix_loss: whether the network predicts normalised patches.
        summary_writer: optional TensorBoard ``SummaryWriter``.
        a_min: the CT window's lower HU (images scaled from ``a_min..a_max`` to [0, 1]), for a colour bar
            in HU. Defaults to None (MRI, or no HU scale).
        a_max: the CT window's upper HU.
        dpi: pixels per inch of the picture. Defaults to 100.
    """

    folder_name = "reconstructions"
    tag = "reconstruction"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        patch_size: Sequence[int] | int,
        norm_pix_loss: bool = False,
        summary_writer: Any | None = None,
        a_min: float | None = None,
        a_max: float | None = None,
        dpi: int = 100,
    ) -> None:
        super().__init__(output_dir, summary_writer, dpi)
        _check_window(a_min, a_max)
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        self.a_min, self.a_max = a_min, a_max

    def _keep_first(self, engine: Engine) -> None:
        if self._first is None:
            output = engine.state.output
            pred, mask = output[CommonKeys.PRED]
            self._first = (output[CommonKeys.IMAGE][:1].detach(), pred[:1].detach(), mask[:1].detach())

    def __call__(self, engine: Engine) -> None:
        if self._first is None or not is_main_process() or not self._available():
            return
        ndim = self._first[0].ndim - 2
        patch = (self.patch_size,) * ndim if isinstance(self.patch_size, int) else tuple(self.patch_size)
        figure = reconstruction_figure(
            *self._first, patch_size=patch, norm_pix_loss=self.norm_pix_loss, a_min=self.a_min, a_max=self.a_max,
            title=f"epoch {engine.state.epoch}", dpi=self.dpi,
        )  # fmt: skip
        self._write(render_figure(figure), int(engine.state.epoch))


class SegmentationOverlaySaver(_PictureSaver):
    """Save image / label / prediction overlays (:func:`segmentation_overlay_figure`) of the first
    validation case after each validation of a segmentation evaluator.

    Writes ``{output_dir}/overlays/epoch_NNNN.png`` (and ``latest.png``) and, with a ``summary_writer``,
    the TensorBoard image ``overlay``. Attach to the evaluator; it reads ``image``, ``label`` and
    ``pred`` of the first item of the first batch (decollated or not, after post-processing: one-hot,
    scores or labels). Without matplotlib, one warning and no pictures.

    Args:
        output_dir: where the ``overlays`` folder goes.
        num_classes: classes including background (fixes the colours). Defaults to None (inferred).
        class_names: names of the foreground classes, for the legend. Defaults to ``class_N``.
        summary_writer: optional TensorBoard ``SummaryWriter``.
        a_min, a_max: the CT window (HU) that scaled the images to [0, 1]. Defaults to None.
        alpha: label opacity. Defaults to 0.5.
        dpi: pixels per inch of the picture. Defaults to 100.
    """

    folder_name = "overlays"
    tag = "overlay"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        summary_writer: Any | None = None,
        a_min: float | None = None,
        a_max: float | None = None,
        alpha: float = 0.5,
        dpi: int = 100,
    ) -> None:
        super().__init__(output_dir, summary_writer, dpi)
        _check_window(a_min, a_max)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.a_min, self.a_max, self.alpha = a_min, a_max, alpha

    def _keep_first(self, engine: Engine) -> None:
        if self._first is not None:
            return
        output = engine.state.output
        item = output[0] if isinstance(output, (list, tuple)) else output
        missing = [str(k) for k in (CommonKeys.IMAGE, CommonKeys.LABEL, CommonKeys.PRED) if k not in item]
        if missing:
            raise ValueError(
                f"SegmentationOverlaySaver: the evaluator's output has no {missing} (keys: {sorted(item)})."
            )
        batched = not isinstance(output, (list, tuple))
        self._first = tuple(
            torch.as_tensor(item[k][0] if batched else item[k]).detach().cpu()
            for k in (CommonKeys.IMAGE, CommonKeys.LABEL, CommonKeys.PRED)
        )

    def __call__(self, engine: Engine) -> None:
        if self._first is None or not is_main_process() or not self._available():
            return
        figure = segmentation_overlay_figure(
            *self._first, num_classes=self.num_classes, class_names=self.class_names, a_min=self.a_min,
            a_max=self.a_max, alpha=self.alpha, title=f"epoch {engine.state.epoch}", dpi=self.dpi,
        )  # fmt: skip
        self._write(render_figure(figure), int(engine.state.epoch))
