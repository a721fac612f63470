"""What a preprocessing run depends on: the resolved data preset, the deterministic chain, storage settings.

:func:`preprocess_settings` resolves a data preset to the settings the stored volumes depend on;
:func:`get_deterministic_transforms` is the deterministic prefix of the training chain that turns a
NIfTI volume into what is stored; :func:`resolve_preset` checks a preset against the run's
``--modality``; :func:`storage_settings` describes the files.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from monai.transforms import Compose, CropForegroundd, SpatialPadd
from monai.utils import ensure_tuple_rep, look_up_option

from monai_mae.data.transforms import MODALITIES, get_pretrain_transforms, load_data_preset

__all__ = [
    "FOREGROUND_MARGIN",
    "IMAGE_DTYPES",
    "LABEL_DTYPE",
    "as_pixdim",
    "deterministic_chain",
    "get_deterministic_transforms",
    "preprocess_settings",
    "require_int",
    "resolve_modality",
    "resolve_preset",
    "storage_settings",
]

#: Voxels kept around the foreground box (after resampling) by default.
FOREGROUND_MARGIN = 4
#: The dtypes an image may be stored in.
IMAGE_DTYPES = ("float16", "float32")
#: The dtype labels are stored in.
LABEL_DTYPE = "uint8"
_ORIENTATION = "RAS"


def require_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int, or ``ValueError`` naming ``name`` when it is not an int >= ``minimum`` (bools refused).

    Examples::

        >>> require_int(2, "workers", 1)
        2
        >>> require_int(True, "margin", 0)
        Traceback (most recent call last):
        ...
        ValueError: margin must be an int >= 0, got True.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def resolve_modality(modality: Any) -> str:
    """``"ct"`` or ``"mri"`` (any case), or ``ValueError`` naming the value and the choices."""
    try:
        return look_up_option(modality.lower() if isinstance(modality, str) else modality, MODALITIES)
    except ValueError as err:
        raise ValueError(f"modality={modality!r} is not supported: {err}") from err


def _preset_defaults() -> dict[str, Any]:
    """Keyword defaults of :func:`get_pretrain_transforms` (what a preset that omits a key gets)."""
    return {
        name: p.default
        for name, p in inspect.signature(get_pretrain_transforms).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def as_pixdim(value: Any) -> list[float] | None:
    """``pixdim`` as three positive floats, or None for the native spacing.

    Examples::

        >>> as_pixdim(1.5), as_pixdim(None)
        ([1.5, 1.5, 1.5], None)
    """
    if value is None:
        return None
    values = [float(v) for v in ensure_tuple_rep(value, 3)] if not isinstance(value, str) else []
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"pixdim must be one or three positive numbers (mm) or None, got {value!r}.")
    return values


def preprocess_settings(preset: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a data preset that the stored volumes depend on, fully resolved.

    Keys the preset leaves out get the defaults of :func:`~monai_mae.data.get_pretrain_transforms`,
    so the result is what the on-the-fly training chain would use. Keys that only matter for random
    crops (``roi_size``, ``num_samples``, ``flip_prob``, ...) are ignored.

    Args:
        preset: a data preset dict (e.g. from :func:`~monai_mae.data.load_data_preset`, or a bundle's
            model data preset), or a packaged preset name / JSON path read with ``load_data_preset``.

    Returns:
        ``{"modality", "pixdim" (3 floats or None), "orientation": "RAS", "intensity",
        "replace_nonfinite"}`` where ``intensity`` is ``{"kind": "window", "a_min", "a_max", "b_min": 0.0,
        "b_max": 1.0, "clip": True}`` for CT and ``{"kind": "normalise", "nonzero": True,
        "channel_wise": True}`` for MRI (``NormalizeIntensityd`` after the foreground crop).

    Raises:
        ValueError: for an unknown modality, a bad ``pixdim``, ``a_min >= a_max`` for CT, image
            ``keys`` other than ``("image",)``, or an orientation other than RAS.

    Examples::

        >>> preprocess_settings("ct")["intensity"]
        {'kind': 'window', 'a_min': -175.0, 'a_max': 250.0, 'b_min': 0.0, 'b_max': 1.0, 'clip': True}
        >>> preprocess_settings({"modality": "mri", "pixdim": 1.0})["pixdim"]
        [1.0, 1.0, 1.0]
    """
    if not isinstance(preset, Mapping):
        preset = load_data_preset(preset)
    full = {**_preset_defaults(), **preset}
    modality = resolve_modality(full["modality"])
    keys = full.get("keys", ("image",))
    if ((keys,) if isinstance(keys, str) else tuple(keys)) != ("image",):
        raise ValueError(f"preprocessing reads one image key, 'image'; the preset has keys={keys!r}.")
    orientation = str(full.get("orientation", _ORIENTATION))
    if orientation != _ORIENTATION:
        raise ValueError(f"the deterministic chain orients volumes to {_ORIENTATION}; the preset has {orientation!r}.")
    if modality == "ct":
        a_min, a_max = float(full["a_min"]), float(full["a_max"])
        if not a_min < a_max:
            raise ValueError(f"a_min ({a_min}) must be below a_max ({a_max}) for the CT window.")
        intensity: dict[str, Any] = {"kind": "window", "a_min": a_min, "a_max": a_max}
        intensity.update({"b_min": 0.0, "b_max": 1.0, "clip": True})
    else:
        intensity = {"kind": "normalise", "nonzero": True, "channel_wise": True}
    return {
        "modality": modality,
        "pixdim": as_pixdim(full["pixdim"]),
        "orientation": _ORIENTATION,
        "intensity": intensity,
        "replace_nonfinite": bool(full.get("replace_nonfinite", True)),
    }


def deterministic_chain(settings: Mapping[str, Any], with_label: bool, margin: int) -> Compose:
    """The deterministic prefix of the training chain for resolved ``settings``: see get_deterministic_transforms."""
    window = settings["intensity"]
    training = get_pretrain_transforms(
        modality=settings["modality"],
        roi_size=1,
        spatial_dims=3,
        pixdim=settings["pixdim"],
        a_min=window.get("a_min", -175.0),
        a_max=window.get("a_max", 250.0),
        num_samples=1,
        train=False,
        with_label=with_label,
        flip_prob=0.0,
        replace_nonfinite=settings["replace_nonfinite"],
    )
    keys = ("image", "label") if with_label else ("image",)
    steps: list[Callable] = []
    for step in training.transforms:
        if isinstance(step, SpatialPadd):  # the end of the deterministic part (padding to the crop size)
            break
        if isinstance(step, CropForegroundd):
            step = CropForegroundd(keys=keys, source_key="image", margin=margin, allow_smaller=True)
        steps.append(step)
    else:
        raise RuntimeError(
            "get_pretrain_transforms no longer pads with SpatialPadd after its deterministic steps; "
            "update monai_mae.data.preprocess.settings to find the end of the deterministic part."
        )
    if not any(isinstance(step, CropForegroundd) for step in steps):
        raise RuntimeError("get_pretrain_transforms has no CropForegroundd before its padding; update preprocess.")
    return Compose(steps)


def get_deterministic_transforms(
    preset: str | os.PathLike[str] | Mapping[str, Any], with_label: bool = False, margin: int = FOREGROUND_MARGIN
) -> Compose:
    """The deterministic part of the training chain of a data preset, as applied by the preprocessing.

    The steps are those of :func:`~monai_mae.data.get_pretrain_transforms` before its padding to the
    crop size (``LoadImaged`` channel first, ``ReplaceNonFinited``, ``Orientationd("RAS")``,
    ``Spacingd`` with nearest interpolation for the label, then ``ScaleIntensityRanged`` +
    ``CropForegroundd`` for CT or ``CropForegroundd`` + ``NormalizeIntensityd`` for MRI), taken from
    that function so that both stay the same; only the foreground crop keeps ``margin`` voxels
    around the foreground box (the training chain uses none).

    Args:
        preset: a data preset dict, name or JSON path (see :func:`preprocess_settings`).
        with_label: also load and transform ``"label"``. Defaults to False.
        margin: voxels kept around the foreground box on each side, clipped at the volume's edge.
            Defaults to :data:`FOREGROUND_MARGIN`.

    Returns:
        A ``monai.transforms.Compose`` of MONAI dictionary transforms; its output ``"image"`` is a
        ``MetaTensor`` (C, X, Y, Z), float32.

    Raises:
        ValueError: for a bad preset (see :func:`preprocess_settings`) or a negative ``margin``.

    Examples::

        >>> [type(t).__name__ for t in get_deterministic_transforms("ct", with_label=True).transforms]
        ['LoadImaged', 'ReplaceNonFinited', 'Orientationd', 'Spacingd', 'ScaleIntensityRanged', 'CropForegroundd']
    """
    margin = require_int(margin, "margin", 0)
    return deterministic_chain(preprocess_settings(preset), bool(with_label), margin)


def resolve_preset(
    preset: str | os.PathLike[str] | Mapping[str, Any] | None, modality: str
) -> tuple[str, str | None, dict[str, Any]]:
    """``(name, source, preset dict)`` of a run's preset, its modality checked against ``modality``.

    Args:
        preset: a preset dict (named ``"custom"``), a packaged preset name, a JSON path, or None for
            the packaged preset of ``modality``.
        modality: the run's ``--modality``.

    Raises:
        ValueError: for an unknown modality, or a preset of another modality (both named).
    """
    modality = resolve_modality(modality)
    if preset is None:
        preset = modality
    if isinstance(preset, Mapping):
        name, source, data = "custom", None, dict(preset)
    else:
        text = os.fspath(preset)
        data = load_data_preset(text)
        is_path = text.endswith(".json") or os.sep in text
        name = Path(text).stem if is_path else (text[len("data_") :] if text.startswith("data_") else text)
        source = str(Path(text).absolute()) if is_path else f"monai_mae/data/presets/{name}.json"
    preset_modality = data.get("modality")
    if preset_modality is not None and str(preset_modality).lower() != modality:
        raise ValueError(
            f"--modality {modality!r} differs from the modality of the preset {name!r} ({preset_modality!r}); pass a "
            "preset of that modality or the matching --modality."
        )
    data["modality"] = modality
    return name, source, data


def storage_settings(image_dtype: str, margin: int, in_channels: int) -> dict[str, Any]:
    """The manifest's ``storage`` entry: layout, order, file format, dtypes, foreground margin and channels."""
    return {
        "layout": "(C, X, Y, Z)",
        "order": "fortran",
        "format": "npy",
        "image_dtype": image_dtype,
        "label_dtype": LABEL_DTYPE,
        "foreground_margin": int(margin),
        "in_channels": int(in_channels),
    }
