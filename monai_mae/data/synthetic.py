"""Synthetic CT-like phantoms and a Decathlon-style dataset writer.

The phantoms give every bundle and test a dataset that needs no download. The ``"simple"`` style
(the default): an air background, an elliptic body with a fat layer, and several organ-like
ellipsoids with their own Hounsfield values, low-frequency texture, gaussian noise and a smooth bias
field. The ``"realistic"`` style (:mod:`monai_mae.data.realistic`): an upper-abdomen scan with a
table, body wall, lungs, touching organs of similar HU, bone, partial volume and correlated noise.
Everything is generated in voxel space with vectorised numpy and is fully determined by the seed.

Run ``python -m monai_mae.data.synthetic OUT_DIR --num 8`` to write a dataset from the shell.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from monai_mae.data.nnunet_raw import is_nnunet_raw, read_nnunet_raw
from monai_mae.data.realistic import (
    REALISTIC_ORGANS,
    check_realistic_options,
    check_shape,
    make_realistic_phantom,
    realistic_spacing,
)
from monai_mae.utils import atomic_write

__all__ = [
    "LAYOUTS",
    "ORGAN_LAYOUT",
    "ORGAN_TYPES",
    "STYLES",
    "ensure_dataset",
    "main",
    "make_phantom",
    "write_synthetic_dataset",
]

logger = logging.getLogger(__name__)

#: Organ-like tissue classes cycled through by :func:`make_phantom`, as
#: ``(name, mean HU, spread of the mean between phantoms, texture amplitude in HU)``.
ORGAN_TYPES: tuple[tuple[str, float, float, float], ...] = (
    ("liver", 70.0, 8.0, 8.0),
    ("kidney", 45.0, 5.0, 5.0),
    ("bone", 550.0, 120.0, 60.0),
    ("lung", -800.0, 40.0, 40.0),
    ("spleen", 55.0, 5.0, 5.0),
)

#: Where each organ type sits in ``layout="anatomical"``, as ``(centre, radii, max_tilt_degrees)``:
#: the centre's x and y are fractions of the soft-tissue semi-axes from the body axis (+x towards
#: the phantom's right in RAS, +y anterior) and its z a fraction of the volume height; the radii are
#: fractions of the same semi-axes and of the height. Each phantom jitters the centre by up to
#: ``_LAYOUT_JITTER``, the radii by up to ``_LAYOUT_SIZE_SPREAD`` and tilts the organ by up to
#: ``max_tilt_degrees``, so the organs keep a patient-like arrangement: a large liver on the right,
#: the spleen on the left at a similar HU, a posterior kidney, the spine along z and the lung on top.
ORGAN_LAYOUT: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    "liver": ((0.40, 0.10, 0.45), (0.42, 0.45, 0.27), 15.0),
    "kidney": ((-0.35, -0.45, 0.45), (0.18, 0.22, 0.22), 20.0),
    "bone": ((0.0, -0.62, 0.50), (0.14, 0.14, 0.42), 5.0),
    "lung": ((-0.35, 0.15, 0.82), (0.35, 0.40, 0.14), 10.0),
    "spleen": ((-0.55, 0.10, 0.50), (0.18, 0.25, 0.17), 20.0),
}
#: Organ placements of :func:`make_phantom` (style ``"simple"``).
LAYOUTS = ("random", "anatomical")
#: Phantom styles of :func:`make_phantom`: the original ellipsoid phantoms, and realistic upper-abdomen scans
#: (:func:`monai_mae.data.realistic.make_realistic_phantom`).
STYLES = ("simple", "realistic")
_SIMPLE_SPACING = (1.5, 1.5, 2.0)
_LAYOUT_JITTER = 0.06
_LAYOUT_SIZE_SPREAD = 0.15

_AIR_HU = -1000.0
_FAT_HU = -100.0
_SOFT_TISSUE_HU = 20.0
_MIN_SHAPE = 8
_MAX_PLACEMENT_TRIES = 300


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """Return ``shape`` as a tuple of three ints, or raise a ValueError naming it."""
    return check_shape(shape, _MIN_SHAPE, context="")


def _check_num_organs(num_organs: int) -> None:
    """Raise a ValueError naming ``num_organs`` unless it is an int in 0..255."""
    if not isinstance(num_organs, (int, np.integer)) or isinstance(num_organs, bool) or not 0 <= num_organs <= 255:
        raise ValueError(f"num_organs must be an int in 0..255, got {num_organs!r}.")


def _check_layout(layout: str) -> None:
    """Raise a ValueError naming ``layout`` unless it is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")


def _resolve_style(
    style: str, layout: str | None, contrast: float | None, noise_hu: float | None, bias_hu: float | None
) -> str:
    """Check the style options; return the layout to use (``"random"`` unless given; realistic: ``"anatomical"``).

    Raises:
        ValueError: for an unknown ``style`` or ``layout``, a ``layout="random"`` with the realistic style, or
            ``contrast``/``noise_hu``/``bias_hu`` given with the simple style; the message names them.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}.")
    if layout is not None:
        _check_layout(layout)
    if style == "realistic":
        if layout == "random":
            raise ValueError("layout='random' does not apply to style='realistic' (its organs are always anatomical).")
        return "anatomical"
    knobs = {"contrast": contrast, "noise_hu": noise_hu, "bias_hu": bias_hu}
    given = {name: value for name, value in knobs.items() if value is not None}
    if given:
        raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in given.items())}: only style='realistic' takes these.")
    return layout or "random"


def _realistic_knobs(contrast: float | None, noise_hu: float | None, bias_hu: float | None) -> dict[str, float]:
    """The difficulty options given (not None), as keyword arguments of ``make_realistic_phantom``."""
    knobs = {"contrast": contrast, "noise_hu": noise_hu, "bias_hu": bias_hu}
    return {name: value for name, value in knobs.items() if value is not None}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], grid: int) -> np.ndarray:
    """A zero-mean, unit-std random field that varies over about ``grid`` cells per axis.

    Gaussian-weighted interpolation of a coarse random grid, one separable matrix per axis.

    Args:
        rng: random generator.
        shape: output shape (X, Y, Z).
        grid: number of coarse cells per axis (larger = finer texture).

    Returns:
        float32 array of ``shape``.
    """
    coarse = rng.standard_normal((grid + 1,) * 3)
    field = coarse
    for axis, size in enumerate(shape):
        pos = (np.arange(size) + 0.5) / size * grid  # voxel centres in coarse-grid units
        weights = np.exp(-0.5 * ((pos[:, None] - np.arange(grid + 1)[None, :]) / 0.6) ** 2)
        weights /= weights.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(weights, np.moveaxis(field, axis, 0), axes=(1, 0)), 0, axis)
    field -= field.mean()
    std = field.std()
    return (field / std if std > 0 else field).astype(np.float32)


def _tilt(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A 3x3 rotation by a uniform angle in ``[0, max_degrees]`` about a uniformly random axis (Rodrigues)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0.0, max_degrees))
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix (QR of a gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _ellipsoid_in_box(
    centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray, shape: tuple[int, int, int]
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Rasterise a rotated ellipsoid inside its bounding box.

    Args:
        centre: (3,) centre in voxels.
        radii: (3,) semi-axes in voxels, along the columns of ``rotation``.
        rotation: (3, 3) rotation whose columns are the ellipsoid axes.
        shape: volume shape.

    Returns:
        ``(box, mask)`` with ``mask`` the boolean ellipsoid on ``volume[box]``, or None when the
        bounding box leaves the volume.
    """
    half = np.sqrt(((rotation * radii[None, :]) ** 2).sum(axis=1))  # bounding half-extent per axis
    lo = np.floor(centre - half).astype(int)
    hi = np.ceil(centre + half).astype(int) + 1
    if np.any(lo < 0) or np.any(hi > np.asarray(shape)):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    axes = [np.arange(a, b, dtype=np.float32) - c for a, b, c in zip(lo, hi, centre)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (bx, by, bz, 3)
    local = grid @ rotation.astype(np.float32)  # coordinates along the ellipsoid axes
    mask = ((local / radii.astype(np.float32)) ** 2).sum(axis=-1) <= 1.0
    return box, mask  # type: ignore[return-value]


def make_phantom(
    shape: Sequence[int] = (96, 96, 64),
    seed: int = 0,
    num_organs: int = 4,
    layout: str | None = None,
    *,
    style: str = "simple",
    contrast: float | None = None,
    noise_hu: float | None = None,
    bias_hu: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one CT-like phantom and its organ labels, deterministically from ``seed``.

    Axes are (x, y, z) in voxels: the body is an elliptic cylinder along z with a fat layer
    (about -100 HU) around soft tissue (about 20 HU); air (-1000 HU) fills the rest. Organ ``k``
    (1..num_organs) is a randomly placed, sized and rotated ellipsoid strictly inside the soft
    tissue and not overlapping the other organs; its tissue cycles through :data:`ORGAN_TYPES`
    (liver, kidney, bone, lung, spleen). Low-frequency texture, gaussian noise (sd 10 HU) and a
    smooth multiplicative and additive bias field are added; values are clipped to
    [-1024, 3071] HU.

    With ``layout="random"`` the organs are placed, sized and rotated anywhere in the soft tissue,
    so nothing but intensity tells them apart. With ``layout="anatomical"`` the first five keep a
    patient-like arrangement (:data:`ORGAN_LAYOUT`: liver right, spleen left, kidney posterior,
    spine along z, lung on top) with per-phantom jitter, so position and neighbourhood carry
    information, as in real CT; organs beyond the fifth are placed at random.

    ``style="realistic"`` draws an upper-abdomen scan instead
    (:func:`monai_mae.data.realistic.make_realistic_phantom`): table, body wall, lungs, touching organs of
    similar HU, spine and ribs, partial volume along z and correlated noise. Its labels ``1..num_organs``
    (0..9) are :data:`monai_mae.data.realistic.REALISTIC_ORGANS`, whose first five are the organs of
    :data:`ORGAN_TYPES` in the same order; ``contrast``, ``noise_hu`` and ``bias_hu`` make it harder.

    Args:
        shape: volume shape (X, Y, Z), each at least 8. Defaults to ``(96, 96, 64)``.
        seed: seed of ``numpy.random.default_rng``; the same seed gives identical arrays.
            Defaults to 0.
        num_organs: number of organs, 0 to 255 (realistic style: labelled organs, 0 to 9). Defaults to 4.
        layout: ``"random"`` or ``"anatomical"`` organ placement of the simple style (see above).
            Defaults to ``"random"``; the realistic style accepts only ``"anatomical"`` (or None).
        style: ``"simple"`` or ``"realistic"`` (:data:`STYLES`). Defaults to ``"simple"``.
        contrast: realistic style only: scale of the soft-tissue HU differences, in [0, 2]. Defaults to 1.
        noise_hu: realistic style only: standard deviation of the noise (HU). Defaults to 15.
        bias_hu: realistic style only: standard deviation of the smooth bias (HU). Defaults to 8.

    Returns:
        ``(image, label)``: float32 image in Hounsfield units and uint8 label volume (0 =
        background, ``k`` = organ ``k``), both of ``shape``.

    Raises:
        ValueError: when ``shape`` is not 3 ints >= 8 (realistic: >= 16), ``num_organs`` is outside
            0..255 (realistic: 0..9), ``layout`` is not one of :data:`LAYOUTS`, ``style`` not one of
            :data:`STYLES`, a realistic-only option is given with the simple style, or the organs do
            not fit into the body (use fewer organs or a larger shape).

    Examples::

        >>> image, label = make_phantom((32, 32, 24), seed=1, num_organs=3)
        >>> image.shape, image.dtype, sorted(np.unique(label).tolist())
        ((32, 32, 24), dtype('float32'), [0, 1, 2, 3])
    """
    layout = _resolve_style(style, layout, contrast, noise_hu, bias_hu)
    if style == "realistic":
        return make_realistic_phantom(shape, seed, num_organs, **_realistic_knobs(contrast, noise_hu, bias_hu))
    dims = _check_shape(shape)
    _check_num_organs(num_organs)
    rng = np.random.default_rng(seed)
    nx, ny, nz = dims
    x = np.arange(nx, dtype=np.float32)[:, None, None]
    y = np.arange(ny, dtype=np.float32)[None, :, None]
    z = np.arange(nz, dtype=np.float32)[None, None, :]

    # body: elliptic cylinder along z whose semi-axes vary slowly with z
    cx, cy = (nx - 1) / 2 + rng.uniform(-0.03, 0.03) * nx, (ny - 1) / 2 + rng.uniform(-0.03, 0.03) * ny
    ax, ay = rng.uniform(0.38, 0.42) * nx, rng.uniform(0.32, 0.38) * ny
    phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.5)
    z_scale = 1.0 + 0.04 * np.sin(2 * np.pi * freq * z / nz + phase)  # (1, 1, Z)
    radius = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2) / z_scale  # 1 on the skin
    fat_fraction = rng.uniform(0.08, 0.12)
    body = radius <= 1.0
    inner = radius <= 1.0 - fat_fraction

    image = np.full(dims, _AIR_HU, dtype=np.float32)
    image[body] = _FAT_HU
    tissue_texture = _smooth_field(rng, dims, grid=6)
    image[inner] = (_SOFT_TISSUE_HU + 6.0 * tissue_texture)[inner]

    # organs: rejection sampling of non-overlapping ellipsoids inside the soft tissue
    label = np.zeros(dims, dtype=np.uint8)
    inner_ax, inner_ay = ax * (1.0 - fat_fraction) * 0.96, ay * (1.0 - fat_fraction) * 0.96
    crowding = (4.0 / max(num_organs, 4)) ** (1.0 / 3.0)
    organ_texture = _smooth_field(rng, dims, grid=8) if num_organs else None
    layout_origin = np.array([cx, cy, 0.0])  # template centres: body axis in x, y; bottom slice in z
    layout_centre_scale = np.array([inner_ax, inner_ay, nz - 1])
    layout_size_scale = np.array([inner_ax, inner_ay, nz])
    for k in range(1, num_organs + 1):
        name, mean_hu, spread, texture_amp = ORGAN_TYPES[(k - 1) % len(ORGAN_TYPES)]
        template = ORGAN_LAYOUT[name] if layout == "anatomical" and k <= len(ORGAN_TYPES) else None
        for attempt in range(_MAX_PLACEMENT_TRIES):
            if template is None:
                shrink = crowding * 0.993**attempt
                radii = np.array(
                    [
                        rng.uniform(0.22, 0.38) * inner_ax * shrink,
                        rng.uniform(0.22, 0.38) * inner_ay * shrink,
                        rng.uniform(0.15, 0.30) * nz * shrink,
                    ]
                )
                rotation = _random_rotation(rng)
                centre = np.array(
                    [
                        cx + rng.uniform(-1, 1) * inner_ax * 0.6,
                        cy + rng.uniform(-1, 1) * inner_ay * 0.6,
                        rng.uniform(0.2, 0.8) * (nz - 1),
                    ]
                )
            else:
                where, size, tilt = template
                spread_factor = rng.uniform(1 - _LAYOUT_SIZE_SPREAD, 1 + _LAYOUT_SIZE_SPREAD, 3)
                radii = np.asarray(size) * layout_size_scale * spread_factor * 0.993**attempt
                rotation = _tilt(rng, tilt)
                jitter = rng.uniform(-_LAYOUT_JITTER, _LAYOUT_JITTER, 3)
                centre = layout_origin + (np.asarray(where) + jitter) * layout_centre_scale
            radii = np.maximum(radii, 1.5)
            placed = _ellipsoid_in_box(centre, radii, rotation, dims)
            if placed is None:
                continue
            box, mask = placed
            if mask.sum() < 8 or not inner[box][mask].all() or label[box][mask].any():
                continue
            label[box][mask] = k
            organ_hu = mean_hu + rng.uniform(-1.0, 1.0) * spread
            texture = organ_texture[box][mask] * texture_amp  # type: ignore[index]
            image[box][mask] = organ_hu + texture
            break
        else:
            raise ValueError(
                f"could not place organ {k} of {num_organs} inside a body of shape {dims}; "
                "use fewer organs or a larger shape."
            )

    # smooth bias (multiplicative on attenuation relative to air, plus additive), then noise
    multiplicative = 1.0 + 0.015 * _smooth_field(rng, dims, grid=2)
    additive = 5.0 * _smooth_field(rng, dims, grid=2)
    image = (image - _AIR_HU) * multiplicative + _AIR_HU + additive
    image += 10.0 * rng.standard_normal(dims, dtype=np.float32)
    np.clip(image, -1024.0, 3071.0, out=image)
    return image.astype(np.float32, copy=False), label


def _ras_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """A RAS+ affine with ``spacing`` on the diagonal and the volume centred on the origin."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=float) - 1.0) / 2.0 * np.asarray(spacing, dtype=float)
    return affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_zooms(tuple(float(s) for s in np.abs(np.diag(affine)[:3])))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # keeps the .nii.gz suffix nibabel needs
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` as JSON to ``path`` with :func:`monai_mae.utils.atomic_write` (fsynced, then renamed)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def write_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    num: int = 8,
    num_validation: int = 2,
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    num_organs: int = 4,
    with_labels: bool = True,
    layout: str | None = None,
    style: str = "simple",
    contrast: float | None = None,
    noise_hu: float | None = None,
    bias_hu: float | None = None,
) -> Path:
    """Write ``num`` phantoms as NIfTI files and a Medical Segmentation Decathlon datalist.

    Layout: ``imagesTr/phantom_XXX.nii.gz`` (int16 Hounsfield units, like scanner CT),
    ``labelsTr/phantom_XXX.nii.gz`` (uint8) and ``datalist.json`` with paths relative to
    ``out_dir``. The first ``num - num_validation`` cases go to ``"training"``, the rest to
    ``"validation"``. Each volume carries a RAS affine with ``spacing`` on the diagonal and the
    volume centred on the world origin (so the origin is non-zero). Every file is written to a
    temporary name and moved into place, and ``datalist.json`` is written last, so a folder
    without ``datalist.json`` is incomplete and a folder with it is complete.

    Args:
        out_dir: output folder, created if needed.
        num: number of cases, >= 1. Defaults to 8.
        num_validation: cases kept for validation, 0..num. Defaults to 2.
        shape: volume shape (X, Y, Z). Defaults to ``(96, 96, 64)``.
        spacing: voxel size in mm (x, y, z), positive. Defaults to ``(1.5, 1.5, 2.0)`` for the simple
            style and :func:`monai_mae.data.realistic.realistic_spacing` (an adult-sized patient) for
            the realistic one.
        seed: dataset seed; case ``i`` uses an independent seed derived from it. Defaults to 0.
        num_organs: organs per phantom. Defaults to 4.
        with_labels: write ``labelsTr`` and ``"label"`` entries. Defaults to True.
        layout: organ placement of :func:`make_phantom`, ``"random"`` or ``"anatomical"``.
            Defaults to ``"random"`` (realistic style: ``"anatomical"``).
        style, contrast, noise_hu, bias_hu: phantom style and the realistic style's difficulty
            options, as in :func:`make_phantom`. Defaults to ``"simple"`` and None (the style's defaults).

    Returns:
        Path of the written ``datalist.json``. With the realistic style, ``"labels"`` names the organs.

    Raises:
        ValueError: for a bad ``num``, ``num_validation``, ``shape``, ``spacing``, ``num_organs``,
            ``layout``, ``style``, ``contrast``, ``noise_hu`` or ``bias_hu``; nothing is written then.

    Examples::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = write_synthetic_dataset(folder, num=2, num_validation=1, shape=(32, 32, 24))
        ...     json.loads(path.read_text())["training"]
        [{'image': 'imagesTr/phantom_000.nii.gz', 'label': 'labelsTr/phantom_000.nii.gz'}]
    """
    if not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}.")
    if not isinstance(num_validation, (int, np.integer)) or not 0 <= num_validation <= num:
        raise ValueError(f"num_validation must be an int in 0..num ({num}), got {num_validation!r}.")
    layout = _resolve_style(style, layout, contrast, noise_hu, bias_hu)
    knobs = _realistic_knobs(contrast, noise_hu, bias_hu)
    if style == "realistic":
        check_realistic_options(num_organs, **knobs)
        default_spacing = realistic_spacing(shape)  # checks the shape (each >= 16)
        dims = _check_shape(shape)
        spacing = default_spacing if spacing is None else spacing
    else:
        dims = _check_shape(shape)
        _check_num_organs(num_organs)
        spacing = _SIMPLE_SPACING if spacing is None else spacing
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing_t):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing!r}.")

    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    if with_labels:
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = _ras_affine(dims, spacing_t)
    case_seeds = np.random.SeedSequence(seed).generate_state(num)
    entries: list[dict[str, str]] = []
    for i, case_seed in enumerate(case_seeds):
        image, label = make_phantom(dims, int(case_seed), num_organs, layout, style=style, **knobs)
        name = f"phantom_{i:03d}.nii.gz"
        _save_nifti(np.round(image).astype(np.int16), affine, out / "imagesTr" / name)
        entry = {"image": f"imagesTr/{name}"}
        if with_labels:
            _save_nifti(label, affine, out / "labelsTr" / name)
            entry["label"] = f"labelsTr/{name}"
        entries.append(entry)

    num_training = num - num_validation
    if style == "realistic":
        options = "".join(f", {name} {value}" for name, value in knobs.items())
        kind = f"realistic style{options}"
        names = {str(k): REALISTIC_ORGANS[k - 1] for k in range(1, num_organs + 1)}
    else:
        kind = f"{layout} layout"
        names = {str(k): f"organ_{k}" for k in range(1, num_organs + 1)}
    datalist = {
        "name": "monai-mae synthetic CT phantoms",
        "description": (
            f"{num} synthetic CT-like phantoms (shape {list(dims)}, spacing {list(spacing_t)} mm, "
            f"seed {seed}, {num_organs} organs, {kind}) written by monai_mae.data.synthetic"
        ),
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **names},
        "numTraining": num_training,
        "training": entries[:num_training],
        "validation": entries[num_training:],
    }
    datalist_path = out / "datalist.json"
    _write_json_atomic(datalist, datalist_path)
    return datalist_path


def _as_flag(value: Any, name: str) -> bool:
    """``value`` as a bool: True/False, or ``"true"``/``"false"`` in any case (a config or command-line string)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be True or False, got {value!r}.")


def ensure_dataset(dataset_dir: str | os.PathLike[str], synthetic_if_missing: bool = False, **kwargs: Any) -> Path:
    """Return ``dataset_dir/datalist.json``; write the synthetic phantoms there only when asked to.

    A folder without ``datalist.json`` that is an nnU-Net v2 raw dataset is read and checked
    (:func:`~monai_mae.data.nnunet_raw.read_nnunet_raw`) and its ``dataset.json`` returned; nothing is written.

    This is what the bundles call. An existing datalist is never touched or rewritten. Without one,
    the synthetic default dataset is generated only with ``synthetic_if_missing=True`` (the bundles
    set it for their own default ``dataset_dir`` and in ``configs/demo_*.json``); otherwise the call
    stops before anything is written, so a mistyped folder never trains on phantoms.

    Args:
        dataset_dir: dataset folder.
        synthetic_if_missing: generate the synthetic dataset when ``datalist.json`` is absent.
            ``"true"``/``"false"`` strings are accepted as well. Defaults to False.
        kwargs: keyword arguments of :func:`write_synthetic_dataset` (``num``, ``shape``, ...),
            used only when the dataset is generated.

    Returns:
        Path of ``datalist.json`` (``dataset.json`` for an nnU-Net raw folder).

    Raises:
        FileNotFoundError: when ``datalist.json`` is absent and ``synthetic_if_missing`` is False;
            the message names the folder and how to get synthetic data there.
        ValueError: for a ``synthetic_if_missing`` that is not a bool, from
            :func:`write_synthetic_dataset` for bad ``kwargs``, or from
            :func:`~monai_mae.data.nnunet_raw.read_nnunet_raw` for a faulty nnU-Net raw folder.

    Examples::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     ensure_dataset(folder, synthetic_if_missing=True, num=2, num_validation=1, shape=(32, 32, 24)).name
        'datalist.json'
        >>> with tempfile.TemporaryDirectory() as folder:  # no datalist.json there: stops, nothing written
        ...     ensure_dataset(folder)
        Traceback (most recent call last):
            ...
        FileNotFoundError: dataset_dir '...' ...: expected ...datalist.json (a Decathlon-style datalist) or ...
    """
    generate = _as_flag(synthetic_if_missing, "synthetic_if_missing")
    datalist_path = Path(dataset_dir) / "datalist.json"
    if datalist_path.is_file():
        return datalist_path
    if is_nnunet_raw(dataset_dir):
        lists = read_nnunet_raw(dataset_dir)  # checked now, before any training starts
        logger.info(
            "%s: nnU-Net raw dataset (no datalist.json): %s",
            dataset_dir,
            ", ".join(f"{len(entries)} {key}" for key, entries in lists.items()),
        )
        return Path(dataset_dir) / "dataset.json"
    if not generate:
        state = "exists but has no datalist.json" if Path(dataset_dir).is_dir() else "does not exist"
        raise FileNotFoundError(
            f"dataset_dir {os.fspath(dataset_dir)!r} {state}: expected {datalist_path} (a Decathlon-style datalist) "
            "or an nnU-Net raw dataset (dataset.json with channel_names, imagesTr/). "
            "Check the path; to train on synthetic phantoms there instead, pass --synthetic_if_missing True to the "
            f"bundle or write them with: python -m monai_mae.data.synthetic {os.fspath(dataset_dir)}"
        )
    logger.info("%s not found: generating the synthetic phantom dataset in %s", datalist_path, dataset_dir)
    return write_synthetic_dataset(dataset_dir, **kwargs)


def main(argv: Sequence[str] | None = None, prog: str = "python -m monai_mae.data.synthetic") -> int:
    """Command line: ``python -m monai_mae.data.synthetic OUT_DIR --num N``.

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.
        prog: the program name in usage and error messages (``monai-mae synth`` from the command).

    Returns:
        Exit status 0.

    Raises:
        SystemExit: on bad arguments (argparse).

    Examples::

        python -m monai_mae.data.synthetic ./data/synthetic --num 8 --num-validation 2 --shape 96 96 64
        python -m monai_mae.data.synthetic ./data/realistic --style realistic --shape 128 128 48 --num-organs 9
    """
    parser = argparse.ArgumentParser(prog=prog, description="Write synthetic CT-like phantoms and datalist.json.")
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument("--num", type=int, default=8, help="number of cases (default 8)")
    parser.add_argument("--num-validation", type=int, default=2, help="cases kept for validation (default 2)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"))
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("SX", "SY", "SZ"),
        help="voxel size in mm (default: 1.5 1.5 2.0; realistic style: an adult-sized patient)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-organs", type=int, default=4)
    parser.add_argument("--layout", choices=LAYOUTS, default=None, help="organ placement (default: random)")
    parser.add_argument("--style", choices=STYLES, default="simple", help="phantom style (default: simple)")
    parser.add_argument("--contrast", type=float, default=None, help="realistic style: soft-tissue contrast scale")
    parser.add_argument("--noise-hu", type=float, default=None, help="realistic style: noise standard deviation (HU)")
    parser.add_argument("--bias-hu", type=float, default=None, help="realistic style: smooth bias std (HU)")
    parser.add_argument("--no-labels", action="store_true", help="write images only")
    args = parser.parse_args(argv)
    try:
        path = write_synthetic_dataset(
            args.out_dir,
            num=args.num,
            num_validation=args.num_validation,
            shape=args.shape,
            spacing=args.spacing,
            seed=args.seed,
            num_organs=args.num_organs,
            with_labels=not args.no_labels,
            layout=args.layout,
            style=args.style,
            contrast=args.contrast,
            noise_hu=args.noise_hu,
            bias_hu=args.bias_hu,
        )
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.num} synthetic cases to {Path(args.out_dir)}; datalist: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
