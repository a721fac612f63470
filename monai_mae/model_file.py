"""Self-describing model files: weights plus everything needed to rebuild the network and its input.

A model file is ``{"network": state_dict, "monai_mae": description}`` where the description holds
the network's class and constructor arguments (``{"_target_": "monai_mae.networks.mae.MAEViT",
"hidden_size": 768, ...}``), the data preset actually used (modality, spacing, orientation,
intensity window or normalisation, crop size, channels), the package version and what run produced
it. The next stage reads it: fine-tuning takes the encoder's architecture and the preprocessing
from the pretrained file (:func:`encoder_settings`, :func:`data_preset_for`), evaluation and
inference rebuild the trained network (:func:`build_network`). Plain state dicts (older runs,
MONAI's own classes, other tools) still load; they just describe nothing.

Settings the user passes that contradict the file stop the run with a ``ValueError`` naming both
values: a silent mismatch would fine-tune a different architecture, or preprocess differently.

The description carries ``format_version`` (:data:`FORMAT_VERSION`); a file of a newer format than this
package reads stops with a ``ValueError`` that says to upgrade, instead of failing somewhere later. Files
without the field (monai-mae 0.1.0) are read as before.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai_mae.data.transforms import load_data_preset
from monai_mae.networks.checkpoint_adapters import DESCRIPTION_KEY, WEIGHTS_KEY, ModelFileAdapter
from monai_mae.networks.checkpoint_io import load_checkpoint_file
from monai_mae.networks.factory import CNN_ARCHITECTURES, merge_cnn_options, unetr_encoder_args
from monai_mae.networks.nnssl import is_nnssl_checkpoint, nnssl_model_file
from monai_mae.utils import atomic_write, unwrap
from monai_mae.version import __version__

__all__ = [
    "FORMAT_VERSION",
    "ModelFile",
    "PREPROCESSING_KEYS",
    "ENCODER_KEYS",
    "network_spec",
    "save_model",
    "read_model",
    "build_network",
    "encoder_settings",
    "architecture_for",
    "data_preset_for",
]

MODEL_FILE = ModelFileAdapter()
#: The model-file format this version writes and the newest it reads. Raise it with every change of the
#: description's layout or meaning (and the package version with it); files without the field predate it.
FORMAT_VERSION = 1
#: Data-preset entries that decide the preprocessing (a conflict in these stops the run).
PREPROCESSING_KEYS = ("modality", "pixdim", "a_min", "a_max", "orientation", "spatial_dims", "in_channels")
#: Encoder settings a fine-tuning network takes from a pretrained MAE file (MAEViT / ViTSeg names).
#: The class a masked-image-pretrained CNN is saved as.
MIM_TARGET = "monai_mae.networks.mim.MaskedImageModel"
ENCODER_KEYS = ("in_channels", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "qkv_bias",
                "proj_type", "pos_embed_type", "mlp_type", "layer_scale_init", "rope_theta", "attn_norm", "mlp_norm",
                "abs_pos_embed", "spatial_dims")  # fmt: skip


@dataclass
class ModelFile:
    """What :func:`read_model` found.

    Attributes:
        state_dict: the weights (prefixes such as ``module.`` kept as saved).
        network: ``{"_target_": class path, **constructor arguments}``, or None for a plain state dict.
        data_preset: the data preset the weights were trained with, or None.
        version: the monai-mae version that wrote the file, or None.
        run: free-form facts about the run (bundle, output folder, epoch, ...), or None.
        source: where it was read from (for messages).
        format_version: the file's model-file format (:data:`FORMAT_VERSION`), or None for files that
            predate the field (plain state dicts, monai-mae 0.1.0).
    """

    state_dict: dict[str, torch.Tensor]
    network: dict[str, Any] | None = None
    data_preset: dict[str, Any] | None = None
    version: str | None = None
    run: dict[str, Any] | None = None
    source: str = "model file"
    format_version: int | None = None

    @property
    def describes(self) -> bool:
        """True when the file says which network it holds."""
        return self.network is not None


def _plain(value: Any) -> Any:
    """JSON-like copy (tuples become lists; loadable with ``weights_only=True``)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} ({value!r}) in a model description.")


def network_spec(network: nn.Module) -> dict[str, Any] | None:
    """``{"_target_": "module.Class", **constructor arguments}`` of ``network``, or None when unknown.

    Known for networks that record their arguments (``init_args``: :class:`MAEViT`,
    :class:`ViTSeg`) or that were built by :func:`~monai_mae.networks.factory.segmentation_network`
    (``network_spec``); DDP and ``torch.compile`` wrappers are unwrapped.
    """
    network = unwrap(network)
    spec = getattr(network, "network_spec", None)
    if isinstance(spec, Mapping):
        return _plain(spec)
    args = getattr(network, "init_args", None)
    if isinstance(args, Mapping):
        cls = type(network)
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **_plain(args)}
    return None


def save_model(
    network: nn.Module,
    path: str | os.PathLike,
    data_preset: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-describing model file (atomically, fsynced): weights, network spec, data preset, versions, run.

    Args:
        network: the trained network (DDP / compile wrappers are unwrapped).
        path: the ``.pt`` file; folders are created.
        data_preset: the preprocessing used (e.g. the bundle's ``data_preset`` plus ``roi_size``).
        run: facts about the run (bundle name, output folder, epoch, metric...).

    Returns:
        The path written.
    """
    network = unwrap(network)
    description = {
        "network": network_spec(network),
        "data_preset": _plain(dict(data_preset)) if data_preset is not None else None,
        "version": __version__,
        "format_version": FORMAT_VERSION,
        "run": _plain(dict(run)) if run is not None else None,
    }
    content = {WEIGHTS_KEY: network.state_dict(), DESCRIPTION_KEY: description}
    return atomic_write(path, lambda f: torch.save(content, f))


def read_model(source: str | os.PathLike | Mapping[str, Any], mmap: bool = False) -> ModelFile:
    """Read a model file written by :func:`save_model`, or any state dict (then it describes nothing).

    An nnssl checkpoint (``checkpoint_final.pth`` of a Primus / EvaMAE encoder) reads as the model file of its
    encoder (:func:`~monai_mae.networks.nnssl.nnssl_model_file`): a ``ViTEncoder`` with the Primus-exact options
    and the data preset of its pretraining plan.

    Args:
        source: a path (``torch.load(map_location="cpu", weights_only=True)``) or an already loaded mapping.
        mmap: map the file's tensors instead of reading them (``torch.load(mmap=True)``): for callers
            that only need the description, so that a large checkpoint is not read in full. Files in
            torch's legacy (non-zip) format cannot be mapped and are read as usual. Defaults to False.

    Raises:
        FileNotFoundError: for a missing path.
        ValueError: when the file cannot be loaded, holds no mapping of tensors, or has a model-file format
            newer than :data:`FORMAT_VERSION` (written by a newer monai-mae).
    """
    name = "checkpoint"
    obj: Any = source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = f"'{path}'"
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {name}.")
        obj = load_checkpoint_file(path, "model file", mmap=mmap)
    if not isinstance(obj, Mapping):
        raise ValueError(f"the model file {name} holds a {type(obj).__name__}, expected a state dict.")
    if is_nnssl_checkpoint(obj):  # nnssl's checkpoint_final.pth: its encoder and plan as a model file
        obj = nnssl_model_file(obj, source=f"the nnssl checkpoint {name}")
    # a model file, else a bundle checkpoint ({"network": ..., "optimizer": ...}), else a plain state dict
    weights, description = MODEL_FILE.unpack(obj) or (obj.get(WEIGHTS_KEY, obj), None)
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    if not isinstance(weights, Mapping) or not any(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"the model file {name} holds no weights (top-level keys: {list(obj)[:8]}).")
    description = description if isinstance(description, Mapping) else {}
    format_version = _check_format_version(description, name)
    data_preset = description.get("data_preset")
    run = description.get("run")
    if isinstance(run, Mapping) and run.get("source") == "nnssl" and isinstance(data_preset, Mapping):
        # the plan says spacing, normalisation and crop; the rest (augmentation, samples) is the packaged preset's
        data_preset = {**load_data_preset(str(data_preset.get("modality", "mri"))), **data_preset}
    return ModelFile(
        state_dict={k: v for k, v in weights.items() if isinstance(v, torch.Tensor)},
        network=description.get("network"),
        data_preset=data_preset,
        version=description.get("version"),
        run=description.get("run"),
        source=name,
        format_version=format_version,
    )


def _check_format_version(description: Mapping[str, Any], name: str) -> int | None:
    """The description's ``format_version`` (None when absent); a newer or malformed one raises ``ValueError``."""
    if "format_version" not in description:
        return None
    value = description["format_version"]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"the model file {name} has format_version {value!r}; expected an int >= 1.")
    if value > FORMAT_VERSION:
        raise ValueError(
            f"the model file {name} has model-file format {value} (written by monai-mae "
            f"{description.get('version', 'unknown')}), but monai-mae {__version__} reads formats up to "
            f"{FORMAT_VERSION}; upgrade monai-mae (pip install -U monai-mae) to read it."
        )
    return value


def _instantiate(spec: Mapping[str, Any], source: str) -> nn.Module:
    target = str(spec.get("_target_", ""))
    module_name, _, class_name = target.rpartition(".")
    if not module_name.startswith(("monai_mae.", "monai.")):
        raise ValueError(f"{source} names network class {target!r}; only monai_mae and monai classes are rebuilt.")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{source} names network class {target!r}, which cannot be imported: {err}.") from err
    return cls(**{k: v for k, v in spec.items() if k != "_target_"})


def _conflicts(given: Mapping[str, Any], recorded: Mapping[str, Any], keys: Any, what: str, source: str) -> None:
    """Raise ``ValueError`` naming every key in ``keys`` where a given (not None) value differs from the recorded one."""
    problems = []
    for key in keys:
        if key in given and given[key] is not None and key in recorded and _plain(given[key]) != _plain(recorded[key]):
            problems.append(f"{key}={_plain(given[key])!r} (given) vs {key}={_plain(recorded[key])!r} (in {source})")
    if problems:
        raise ValueError(
            f"{what} contradict the checkpoint {source}: "
            + "; ".join(problems)
            + ". Leave these settings out to take them from the checkpoint, or use another checkpoint."
        )


def build_network(source: str | os.PathLike | ModelFile, load_weights: bool = True, **overrides: Any) -> nn.Module:
    """Rebuild the network described by a model file and (by default) load its weights.

    Args:
        source: a model file written by :func:`save_model` (or its :class:`ModelFile`).
        load_weights: load the file's weights (strict). Defaults to True.
        overrides: constructor arguments to set; None values are ignored. A value that differs from
            the recorded one raises, except for arguments that do not change the weights' shapes
            (``img_size`` for inference on other crops, dropout, drop path, activation checkpointing);
            so does an argument the file does not record (the file decides the network).

    Raises:
        ValueError: when the file describes no network, names a class outside monai / monai_mae, or an
            override contradicts it or is not among its recorded arguments.
    """
    model = source if isinstance(source, ModelFile) else read_model(source)
    if not model.describes:
        raise ValueError(
            f"{model.source} is a plain state dict without a network description; build the network in the config "
            "(network_def) instead, or re-save it with monai_mae.model_file.save_model."
        )
    spec = dict(model.network)
    free = {"img_size", "dropout_rate", "drop_path_rate", "activation_checkpointing", "save_attn"}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(k for k in given if k not in spec and k not in free)
    if unknown:
        raise ValueError(
            f"network settings {unknown} are not arguments recorded in {model.source}, which decides the network "
            f"({spec.get('_target_')}; recorded: {sorted(k for k in spec if k != '_target_')}). Leave them out, "
            f"or pass only recorded arguments with the recorded values."
        )
    _conflicts(given, spec, [k for k in given if k not in free], "network settings", model.source)
    spec.update(given)
    network = _instantiate(spec, model.source)
    if load_weights:
        network.load_state_dict(model.state_dict)
    return network


def encoder_settings(
    pretrained_ckpt: str | os.PathLike | None,
    architecture: str = "vitseg",
    given: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The encoder settings for fine-tuning: from the pretrained MAE file, checked against ``given``.

    Args:
        pretrained_ckpt: an MAE model file written by the ``mae_pretrain`` bundle; ``""`` / None (training
            from scratch) or a plain state dict returns ``given`` as it is.
        architecture: ``"vitseg"`` or ``"unetr"`` (UNETR fixes 12 layers and 16^3 patches and has no
            RoPE / SwiGLU / LayerScale: such an encoder raises), or a CNN (``"unet"``, ``"dynunet"``,
            ``"segresnet"``): then the file must be a :class:`~monai_mae.networks.mim.MaskedImageModel` of that
            architecture, and its recorded network options are returned (checked against ``given``).
        given: settings the user passed (None values count as not passed).
        defaults: settings used where neither ``given`` nor the file has a value (e.g. the bundle's
            ``qkv_bias: true`` for training from scratch or from a plain state dict).

    Returns:
        ``{hidden_size, mlp_dim, num_layers, num_heads, patch_size, qkv_bias, ...}``: keyword arguments of
        :func:`~monai_mae.networks.factory.segmentation_network`'s ``encoder``.

    Raises:
        ValueError: when a given setting contradicts the file (both values named), or the encoder cannot
            be built as ``architecture``.
    """
    given = {k: v for k, v in dict(given or {}).items() if v is not None}
    recorded: dict[str, Any] = {}
    source = "the settings"
    model = None
    if pretrained_ckpt is not None and os.fspath(pretrained_ckpt).strip():
        model = read_model(pretrained_ckpt, mmap=True)
        source = model.source
    if architecture in CNN_ARCHITECTURES or (model is not None and _is_masked_image_model(model)):
        return _cnn_settings(model, architecture, given)
    if model is not None:
        if model.describes:
            recorded = {k: model.network[k] for k in ENCODER_KEYS if k in model.network}
            _conflicts(given, recorded, ENCODER_KEYS, "encoder settings", model.source)
    settings = {**dict(defaults or {}), **recorded, **given}
    if architecture == "unetr":
        return unetr_encoder_args(settings, source)
    return settings


def _is_masked_image_model(model: ModelFile) -> bool:
    """Whether ``model`` describes a :class:`~monai_mae.networks.mim.MaskedImageModel` (a pretrained CNN)."""
    return model.describes and model.network.get("_target_") == MIM_TARGET


def _cnn_settings(model: ModelFile | None, architecture: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The CNN options recorded by a masked-image-pretrained file, after checking that it fits ``architecture``."""
    vit_settings = sorted(k for k in given if k in ENCODER_KEYS and k not in ("in_channels", "spatial_dims"))
    if vit_settings:
        raise ValueError(
            f"encoder settings {vit_settings} are for a ViT encoder ('vitseg' / 'unetr'); architecture="
            f"{architecture!r} takes its options from its own setting (e.g. {architecture}#channels)."
        )
    if model is None:
        return dict(given)
    recorded = model.network if model.describes else None
    if not _is_masked_image_model(model):
        held = recorded.get("_target_") if recorded else "a plain state dict"
        raise ValueError(
            f"architecture={architecture!r} starts from a masked-image-pretrained CNN of the same architecture, "
            f"but {model.source} holds {held}; pretrain with the mae_pretrain bundle's configs/mim_cnn.json, or "
            "use architecture 'vitseg' / 'unetr' for an MAE encoder."
        )
    if recorded.get("architecture") != architecture:
        raise ValueError(
            f"architecture={architecture!r} differs from the network pretrained in {model.source} "
            f"({recorded.get('architecture')!r}); leave architecture unset to take it from the file."
        )
    return merge_cnn_options(recorded.get("options"), given, model.source)


def architecture_for(
    pretrained_ckpt: str | os.PathLike | None, default: str = "vitseg", scratch: str | None = None
) -> str:
    """The fine-tuning architecture a pretrained file implies.

    A masked-image-pretrained CNN gives its own architecture; an MAE (ViT) file gives the ViT network its
    pretraining was meant for (``run["finetune_architecture"]``, which the ``mae_pretrain`` bundle records:
    ``"vitseg"`` or ``"unetr"``), and a file without that record or a plain state dict gives ``default``; no file
    (``""``, training from scratch) gives ``scratch`` (``default`` when None).

    Examples::

        >>> architecture_for("", default="vitseg", scratch="unet")
        'unet'
    """
    if pretrained_ckpt is None or not os.fspath(pretrained_ckpt).strip():
        return default if scratch is None else scratch
    if not Path(pretrained_ckpt).is_file():
        return default
    model = read_model(pretrained_ckpt, mmap=True)
    if _is_masked_image_model(model):
        return str(model.network["architecture"])
    meant_for = (model.run or {}).get("finetune_architecture") if model.describes else None
    return str(meant_for) if meant_for in ("vitseg", "unetr") else default


def data_preset_for(
    ckpt: str | os.PathLike | ModelFile | None, modality: str | None = None, **given: Any
) -> dict[str, Any]:
    """The data preset of a run that starts from ``ckpt``: the file's, checked against what is given.

    Without a file, or with a file that records no preset, the packaged preset of ``modality``
    (default ``"ct"``) with ``given`` applied.

    Args:
        ckpt: a model file (pretrained MAE for fine-tuning, trained network for evaluation/inference) or its
            :class:`ModelFile` (read once, shared with :func:`build_network`); ``""`` / None for none.
        modality: ``"ct"`` / ``"mri"``, or None to take the file's.
        given: other preset entries passed by the user (None values count as not passed).

    Raises:
        ValueError: when ``modality`` or a preprocessing entry (:data:`PREPROCESSING_KEYS`) contradicts the file.
    """
    given = {k: v for k, v in {"modality": modality, **given}.items() if v is not None}
    recorded = None
    if isinstance(ckpt, ModelFile) or (ckpt is not None and os.fspath(ckpt).strip() and Path(ckpt).is_file()):
        model = ckpt if isinstance(ckpt, ModelFile) else read_model(ckpt, mmap=True)
        recorded = model.data_preset
        if recorded:
            _conflicts(given, recorded, PREPROCESSING_KEYS, "data settings", model.source)
            return {**recorded, **given}
    preset = load_data_preset(given.get("modality", "ct"))
    return {**preset, **given}
