"""A training run becomes a MONAI model-zoo bundle: ``monai-mae export RUN OUT``.

A run folder (the ``output_dir`` of ``mae_pretrain`` or ``mae_finetune``) holds the model files but not
the configs, which live in the package. :func:`export_run` writes a folder that stands on its own::

    OUT/
      configs/inference.json   the bundle's inference config with the run's settings written in: the network
                               (class and arguments), the data preset, crop size, classes; paths relative to
                               bundle_root, so nothing points into the repository, the package or the run
      configs/metadata.json    the bundle's metadata with this run's input/output shapes, classes and the
                               versions of the exporting environment
      configs/logging.conf
      models/model.pt          the run's self-describing model file (model_best.pt when the run has one);
                               the run's folders in its description are cut to their names
      docs/README.md           what it was trained on and the validation figures the run recorded
      LICENSE

It runs with ``python -m monai.bundle run --config_file OUT/configs/inference.json --bundle_root OUT
--dataset_dir DATA`` and loads with ``monai.bundle.load(name, bundle_dir=..., workflow_type="inference",
key_in_ckpt="network")``; segmentation networks export with ``ckpt_export --key_in_ckpt network``. The
model file is monai-mae's (weights under ``"network"``, the description under ``"monai_mae"``), so
fine-tuning can start from an exported MAE as from the run.

``format="nnssl"`` writes the run's encoder (a ``primus_*`` MAE or ViTSeg, 8^3 patches) as nnssl writes its
pretrained weights instead: ``OUT/checkpoint_final.pth`` (``network_weights`` with ``down_projection.*`` and
``eva.*``, ``nnssl_adaptation_plan``) and ``OUT/adaptation_plan.json``, which nnssl's and nnU-Net's fine-tuning
read (:func:`~monai_mae.networks.nnssl.save_nnssl_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.bundle import ConfigParser

from monai_mae.model_file import ModelFile, build_network, read_model
from monai_mae.networks.checkpoint_adapters import DESCRIPTION_KEY
from monai_mae.networks.checkpoint_io import load_checkpoint_file
from monai_mae.networks.nnssl import NNSSL_PLAN_KEY, nnssl_checkpoint
from monai_mae.packaged import BUNDLE_NAMES, bundle_dir
from monai_mae.utils import atomic_write
from monai_mae.version import __version__

__all__ = ["EXPORT_FORMATS", "RUN_SETTINGS_NAME", "export_run", "run_model_file"]

#: What ``monai-mae export --format`` writes: a MONAI model-zoo bundle, or an nnssl checkpoint of the encoder.
EXPORT_FORMATS = ("bundle", "nnssl")
#: The file ``monai-mae pretrain`` / ``finetune`` writes into the run folder: the command and its settings.
RUN_SETTINGS_NAME = "run_settings.json"
#: Flat settings of the inference configs whose value the run decides (resolved and written in as literals).
_RESOLVED = ("roi_size", "spatial_dims", "num_classes", "masking_ratio", "norm_pix_loss")
#: Items of the inference configs that only serve to read the model file, dropped once everything is written in.
_DROPPED = ("model_file", "best_ckpt", "final_ckpt", "modality")
#: Entries of a model file's ``run`` record that hold paths (cut to their last component on export).
_RUN_PATHS = ("output_dir", "pretrained_ckpt")
_PACKAGES = ("pytorch-ignite", "nibabel", "einops", "tensorboard", "fire")
#: Settings of run_settings.json left out of the README (folders), and the data-preset entries it shows.
_UNSHOWN = ("dataset_dir", "output_dir", "bundle_root", "preprocessed_dir", "pretrained_ckpt", "ckpt_path")
_SHOWN_PRESET = (
    "modality",
    "pixdim",
    "a_min",
    "a_max",
    "roi_size",
    "spatial_dims",
    "in_channels",
    "num_classes",
    "class_names",
)


def run_model_file(run_dir: str | os.PathLike[str], ckpt: str | os.PathLike[str] | None = None) -> Path:
    """The model file of a run: ``ckpt`` when given, else ``models/model_best.pt``, else ``models/model.pt``.

    Args:
        run_dir: the run's ``output_dir``.
        ckpt: a model file to use instead (any path).

    Raises:
        FileNotFoundError: naming the files looked for.
    """
    if ckpt is not None and str(ckpt):
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: '{path}'.")
        return path
    models = Path(run_dir) / "models"
    for name in ("model_best.pt", "model.pt"):
        if (models / name).is_file():
            return models / name
    raise FileNotFoundError(
        f"no model file in the run folder '{run_dir}': looked for {models / 'model_best.pt'} and {models / 'model.pt'}."
    )


def _bundle_of(model: ModelFile) -> str:
    """Which packaged bundle made the file: its ``run`` record, else an MAE means ``mae_pretrain``."""
    recorded = (model.run or {}).get("bundle")
    if recorded in BUNDLE_NAMES:
        return str(recorded)
    return "mae_pretrain" if str(model.network.get("_target_", "")).endswith(".MAEViT") else "mae_finetune"


def _check_literal(value: Any, where: str) -> None:
    """A value written into a config must not read as a MONAI reference, expression or macro."""
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise ValueError(f"{where} holds {value!r}, which a MONAI config would evaluate; it cannot be written in.")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_literal(item, f"{where}#{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_literal(item, f"{where}#{index}")


def _dumps(value: Any, indent: int = 0) -> str:
    """JSON with one key per line and lists of numbers or strings on one line (as the bundles' own configs)."""
    pad = " " * (indent + 4)
    if isinstance(value, Mapping) and value:
        items = [f"{pad}{json.dumps(str(k))}: {_dumps(v, indent + 4)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, (Mapping, list)) for v in value):
        return "[\n" + ",\n".join(pad + _dumps(v, indent + 4) for v in value) + "\n" + " " * indent + "]"
    return json.dumps(value)


def _plain_json(value: Any) -> Any:
    """A parsed config value as plain JSON (tensors and arrays become lists)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _inference_config(bundle: str, model_path: Path, model: ModelFile) -> dict[str, Any]:
    """The bundle's inference.json with what the run decides written in and the model file at bundle_root."""
    source = bundle_dir(bundle) / "configs" / "inference.json"
    config = json.loads(source.read_text())
    parser = ConfigParser()
    parser.read_config(str(source))
    parser.update({"bundle_root": str(bundle_dir(bundle)), "ckpt_path": str(model_path), "device": "cpu"})
    resolved = {key: _plain_json(parser.get_parsed_content(key)) for key in _RESOLVED if key in config}
    for key in _DROPPED:
        config.pop(key, None)
    network, preset = dict(model.network), dict(model.data_preset or {})
    _check_literal(network, "the model file's network")
    _check_literal(preset, "the model file's data preset")
    config.update(resolved)
    config.update(
        {
            "ckpt_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
            "synthetic_if_missing": False,  # a shared model does not make up data: --dataset_dir names the data
            "data_preset": preset,
            "network_def": network,
        }
    )
    # initialize only seeds (monai.bundle.load runs initialize and must not need a dataset); the data check runs first
    checks = [item for item in config.get("initialize", []) if "ensure_dataset" in str(item)]
    config["initialize"] = [item for item in config.get("initialize", []) if item not in checks]
    config["run"] = checks + list(config.get("run", []))
    return config


def _version(package: str, fallback: str) -> str:
    try:
        return package_metadata.version(package).split("+")[0]
    except package_metadata.PackageNotFoundError:
        return fallback


def _metadata(bundle: str, model: ModelFile, name: str, run_name: str) -> dict[str, Any]:
    """The bundle's metadata.json for this run: shapes, channels, classes from the file; this environment's versions."""
    meta = json.loads((bundle_dir(bundle) / "configs" / "metadata.json").read_text())
    preset = model.data_preset or {}
    roi = list(preset.get("roi_size") or meta["network_data_format"]["inputs"]["image"]["spatial_shape"])
    in_channels = int(preset.get("in_channels", 1))
    required = dict(meta.get("required_packages_version", {}))
    required.update({p: _version(p, required[p]) for p in _PACKAGES if p in required})
    required["monai-mae"] = __version__
    meta.pop("optional_packages_version", None)  # MONAI's parser reads this deprecated key as required_packages_version
    epoch = (model.run or {}).get("epoch")
    meta.update(
        {
            "name": name,
            "monai_version": monai.__version__.split("+")[0],
            "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": np.__version__,
            "required_packages_version": required,
            "description": f"{meta['description']} Exported by monai-mae {__version__} from the run '{run_name}'"
            + (f" (epoch {epoch})." if epoch is not None else "."),
        }
    )
    inputs, outputs = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    channels = {str(c): "image" for c in range(in_channels)}
    inputs.update(spatial_shape=roi, num_channels=in_channels, channel_def=channels)
    inputs["modality"] = str(preset.get("modality", inputs["modality"])).upper()
    outputs["spatial_shape"] = roi
    if bundle == "mae_finetune":
        num_classes = int(preset.get("num_classes", outputs["num_channels"]))
        names = list(preset.get("class_names") or [f"class_{i}" for i in range(1, num_classes)])
        classes = {"0": "background", **{str(i + 1): n for i, n in enumerate(names)}}
        outputs.update(num_channels=num_classes, channel_def=classes)
    else:
        outputs["num_channels"] = in_channels
    return meta


def _model_file_without_paths(model_path: Path, target: Path) -> None:
    """Copy the model file with the run's folders in its ``run`` record cut to their names."""
    content = load_checkpoint_file(model_path, "model file")
    description = content.get(DESCRIPTION_KEY) if isinstance(content, Mapping) else None
    run = description.get("run") if isinstance(description, Mapping) else None
    if isinstance(run, dict):
        for key in _RUN_PATHS:
            if isinstance(run.get(key), str) and run[key]:
                run[key] = Path(run[key]).name
    atomic_write(target, lambda f: torch.save(content, f))


def _figures(run_dir: Path, model: ModelFile) -> list[str]:
    """Lines about the validation figures the run recorded (best-model record, evaluate's metrics.json)."""
    lines = []
    run = model.run or {}
    for key, value in run.items():
        if key.startswith("val_") and isinstance(value, (int, float)):
            lines.append(f"- `{key}` {value:.4f} at epoch {run.get('epoch', '?')} (the validation that kept them)")
    metrics_file = run_dir / "eval" / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except json.JSONDecodeError:
            metrics = {}
        values = metrics.get("metrics", {})
        for key, value in sorted(values.items()) if isinstance(values, Mapping) else []:
            if isinstance(value, (int, float)):
                cases, key_list = metrics.get("num_cases", "?"), metrics.get("datalist_key", "?")
                lines.append(f"- `{key}` {value:.4f} (`monai-mae evaluate`, {cases} cases, list `{key_list}`)")
    return lines


def _training_lines(run_dir: Path, model: ModelFile, bundle: str) -> list[str]:
    """Lines about what the run was trained on: the command's settings when recorded, the data preset, the start."""
    preset, run = model.data_preset or {}, model.run or {}
    epoch = f", the weights after epoch {run['epoch']}" if "epoch" in run else ""
    lines = [f"- bundle `{bundle}`, network `{model.network.get('_target_')}`{epoch}"]
    settings_file = run_dir / RUN_SETTINGS_NAME
    if settings_file.is_file():
        recorded = json.loads(settings_file.read_text())
        settings = recorded.get("settings", {})
        data = settings.get("dataset_dir") or settings.get("preprocessed_dir")
        if data:
            lines.append(f"- data: the folder `{Path(str(data)).name}`" + _case_counts(Path(str(data))))
        shown = {k: _no_folder(v) for k, v in settings.items() if k not in _UNSHOWN}
        if shown:
            lines.append("- settings: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(shown.items())))
    else:
        lines.append(
            f"- the run folder holds no {RUN_SETTINGS_NAME} (it was not started by `monai-mae`): "
            "the data it was trained on is not recorded"
        )
    shown_preset = {k: preset[k] for k in _SHOWN_PRESET if k in preset}
    lines.append("- data preset: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in shown_preset.items()))
    if run.get("pretrained_ckpt"):
        lines.append(f"- encoder initialised from `{Path(str(run['pretrained_ckpt'])).name}`")
    for key in ("masking_ratio", "norm_pix_loss", "visible_loss_weight"):
        if key in run:
            lines.append(f"- `{key}` {json.dumps(run[key])}")
    return lines


def _no_folder(value: Any) -> Any:
    """An absolute path cut to its last component (the README names no folder of the machine it was made on)."""
    return Path(value).name if isinstance(value, str) and os.path.isabs(value) else value


def _case_counts(data: Path) -> str:
    try:
        datalist = json.loads((data / "datalist.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    counts = {key: len(datalist[key]) for key in ("training", "validation") if isinstance(datalist.get(key), list)}
    return " (" + ", ".join(f"{n} {key}" for key, n in counts.items()) + " cases)" if counts else ""


def _readme(name: str, bundle: str, run_dir: Path, model: ModelFile, meta: Mapping[str, Any]) -> str:
    figures = _figures(run_dir, model) or ["- none recorded (no validation ran, and no `eval/metrics.json`)"]
    seg = bundle == "mae_finetune"
    output = "segmentations" if seg else "reconstructions_nifti"
    lines = [
        f"# {name}",
        "",
        f"{meta['task']}. Exported by `monai-mae export` (monai-mae {__version__}) from the run `{run_dir.name}` of "
        f"the `{bundle}` bundle.",
        "",
        "## Training",
        "",
        *_training_lines(run_dir, model, bundle),
        "",
        "## Validation",
        "",
        *figures,
        "",
        "## Use",
        "",
        "Needs `pip install monai-mae` (the network classes and the model-file reader); the settings the run "
        "decided (network, preprocessing, crop size, classes) are written into `configs/inference.json`.",
        "",
        "```bash",
        "python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\",
        "    --logging_file configs/logging.conf --bundle_root . --dataset_dir DATA --output_dir OUT",
        "```",
        "",
        f"reads `DATA/datalist.json` (list `validation`; `--datalist_key test` for another) and writes "
        f"`OUT/{output}/`. In Python:",
        "",
        "```python",
        "from monai.bundle import load",
        f'net = load("{name}", bundle_dir="PARENT_FOLDER", workflow_type="inference", key_in_ckpt="network")',
        "```",
        "",
        "`models/model.pt` is a monai-mae model file: the weights under `network`, the network class, its "
        "arguments and the data preset under `monai_mae`; `monai_mae.model_file.build_network` rebuilds the "
        "network from it alone, and fine-tuning starts from it as from the run.",
    ]
    if seg:
        lines += [
            "",
            "TorchScript (a ViTSeg traces, UNETR scripts):",
            "",
            "```bash",
            "python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\",
            "    --key_in_ckpt network --meta_file configs/metadata.json --config_file configs/inference.json \\",
            '    --bundle_root . --use_trace True --input_shape "[1, 1, 96, 96, 96]"',
            "```",
        ]
    lines += [
        "",
        "## Sharing (optional)",
        "",
        "The folder is a MONAI bundle, so MONAI's Hugging Face Hub helpers share it: "
        "`python -m monai.bundle push_to_hf_hub --repo OWNER/NAME --name NAME --bundle_dir PARENT_FOLDER` "
        "(needs `huggingface_hub` and a token) and `python -m monai.bundle download --name NAME --source "
        "huggingface_hub --repo OWNER/NAME` on the other side.",
        "",
        "## License",
        "",
        "Apache-2.0 (`LICENSE`), as monai-mae. Research use; not for clinical use.",
        "",
    ]
    return "\n".join(lines)


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    format: str = "bundle",
    ckpt: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> Path:
    """Write the run ``run_dir`` as a MONAI model-zoo bundle (or an nnssl checkpoint) in ``out_dir``.

    Args:
        run_dir: the run's ``output_dir`` (with ``models/model.pt`` or ``models/model_best.pt``).
        out_dir: the bundle folder to write; it must not exist or be empty.
        format: ``"bundle"``, or ``"nnssl"``: the encoder of a ``primus_*`` run as ``out_dir/checkpoint_final.pth``
            and ``out_dir/adaptation_plan.json`` (:func:`_export_nnssl`).
        ckpt: the model file to export instead of the run's best (else final) model.
        name: the bundle's name in its metadata and README; defaults to ``out_dir``'s folder name.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: for another ``format``, a model file that does not describe its network, a non-empty
            ``out_dir``, or (``"nnssl"``) an encoder that is no Primus size with the Primus-exact options.
        FileNotFoundError: when the run folder has no model file.

    Examples::

        export_run("runs/finetune", "bundles_out/liver_vitseg")
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {list(EXPORT_FORMATS)}, got {format!r}.")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: '{run_dir}'.")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"export folder '{out_dir}' exists and is not empty; name a new folder.")
    model_path = run_model_file(run_dir, ckpt)
    model = read_model(model_path, mmap=True)
    if not model.describes:
        raise ValueError(
            f"{model.source} does not describe its network (a plain state dict); only model files written by "
            "monai-mae's bundles can be exported."
        )
    if format == "nnssl":
        return _export_nnssl(model, out_dir)
    bundle = _bundle_of(model)
    name = name or out_dir.name
    config = _inference_config(bundle, model_path, model)
    meta = _metadata(bundle, model, name, run_dir.name)

    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    (out_dir / "docs").mkdir(exist_ok=True)
    _model_file_without_paths(model_path, out_dir / "models" / "model.pt")
    source = bundle_dir(bundle)
    (out_dir / "configs" / "inference.json").write_text(_dumps(config) + "\n")
    (out_dir / "configs" / "metadata.json").write_text(_dumps(meta) + "\n")
    shutil.copyfile(source / "configs" / "logging.conf", out_dir / "configs" / "logging.conf")
    shutil.copyfile(source / "LICENSE", out_dir / "LICENSE")
    (out_dir / "docs" / "README.md").write_text(_readme(name, bundle, run_dir, model, meta))
    return out_dir


def _export_nnssl(model: ModelFile, out_dir: Path) -> Path:
    """The model file's encoder as nnssl's ``checkpoint_final.pth`` and ``adaptation_plan.json`` in ``out_dir``."""
    try:
        checkpoint = nnssl_checkpoint(build_network(model), model.data_preset)
    except ValueError as err:
        raise ValueError(f"{model.source} cannot be written as an nnssl checkpoint: {err}") from err
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "checkpoint_final.pth", lambda f: torch.save(checkpoint, f))
    plan = {**checkpoint[NNSSL_PLAN_KEY], "trainer_name": checkpoint["trainer_name"]}  # as nnssl writes it
    (out_dir / "adaptation_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    return out_dir
