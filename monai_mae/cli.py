"""The ``monai-mae`` command (also ``python -m monai_mae``): a thin front on the packaged bundles and data tools.

Subcommands::

    monai-mae synth DIR [--num N] [--num-validation N] [--shape X Y Z]   synthetic CT phantoms + datalist.json
    monai-mae preprocess RAW OUT --modality ct|mri                        preprocess once, for training
    monai-mae pretrain --data DIR --out RUN                               mae_pretrain train.json
    monai-mae finetune --data DIR --out RUN [--pretrained FILE]           mae_finetune train.json
    monai-mae evaluate --data DIR --out RUN [--ckpt FILE]                 mae_finetune train.json + evaluate.json
    monai-mae infer --data DIR --out RUN [--ckpt FILE]                    inference.json of the file's bundle
    monai-mae export RUN OUT [--format bundle|nnssl]                      a MONAI model-zoo bundle / nnssl checkpoint

The bundle commands run ``monai.bundle.run`` on the bundle configs shipped in the package. Settings are
layered in this order, the later winning: the bundle's configs, each ``--config FILE`` (a JSON of bundle
settings, ``{"max_epochs": 5, "network_def#hidden_size": 384}``), the short flags (``--data``, ``--out``,
``--device``, ``--epochs``, ...), each ``--set KEY=VALUE``, and trailing ``--KEY VALUE`` pairs as
``python -m monai.bundle run`` takes them, so every bundle setting stays reachable. Values are read as JSON,
then as a Python literal, else kept as a string. ``--dry-run`` prints the equivalent ``python -m monai.bundle
run`` command instead of running it.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.bundle import run as bundle_run

from monai_mae.data import preprocess, synthetic
from monai_mae.data.transforms import MODALITIES
from monai_mae.export import RUN_SETTINGS_NAME, export_run, run_model_file
from monai_mae.model_file import read_model
from monai_mae.packaged import BUNDLE_NAMES, bundle_dir
from monai_mae.utils import atomic_write
from monai_mae.version import __version__

__all__ = ["BundleCall", "FILE_DECIDES", "build_parser", "bundle_call", "main", "parse_value"]

PROG = "monai-mae"
#: Subcommands handed to an existing command line of the package, with their arguments as they are.
_FORWARDED = {"synth": synthetic.main, "preprocess": preprocess.main}
#: Data-preset entries a model file decides for evaluate / infer: a given value must equal the file's.
FILE_DECIDES = ("num_classes", "class_names", "spatial_dims", "in_channels")


@dataclass
class BundleCall:
    """One ``monai.bundle.run`` call: which bundle, its config files, the user's config files, the settings on top."""

    command: str
    bundle: str
    bundle_files: list[str]
    user_files: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return bundle_dir(self.bundle)

    @property
    def config_files(self) -> list[str]:
        """The bundle's config files, then the user's, in the order they are layered."""
        return [str(self.root / "configs" / name) for name in self.bundle_files] + list(self.user_files)

    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``monai.bundle.run``."""
        configs = self.root / "configs"
        return {
            "config_file": list(self.config_files),
            "meta_file": str(configs / "metadata.json"),
            "logging_file": str(configs / "logging.conf"),
            "bundle_root": str(self.root),
            **self.settings,
        }

    def shell(self) -> str:
        """The equivalent ``python -m monai.bundle run ...`` command line."""
        kwargs = self.run_kwargs()
        words = ["python", "-m", "monai.bundle", "run", "--config_file", json.dumps(kwargs.pop("config_file"))]
        for key, value in kwargs.items():
            words += [f"--{key}", value if isinstance(value, str) else repr(value)]
        return shlex.join(words)


def parse_value(text: str) -> Any:
    """A command-line value: JSON (``16``, ``[16, 16, 16]``, ``true``, ``null``), else a Python literal
    (``True``, ``(1, 2)``), else the string itself (``cpu``, ``$@lr * 2``, ``%file.json#key``).

    Examples::

        >>> parse_value("[16, 16, 16]"), parse_value("False"), parse_value("cuda:1")
        ([16, 16, 16], False, 'cuda:1')
    """
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _pairs(words: Sequence[str]) -> dict[str, Any]:
    """Trailing ``--KEY VALUE`` / ``--KEY=VALUE`` words as settings."""
    settings: dict[str, Any] = {}
    words = list(words)
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) == 2:
            raise ValueError(f"unexpected argument {word!r}: bundle settings go as --KEY VALUE (e.g. --max_epochs 5).")
        key, eq, value = word[2:].partition("=")
        if not eq:
            if i + 1 >= len(words) or (words[i + 1].startswith("--") and len(words[i + 1]) > 2):
                raise ValueError(f"the bundle setting --{key} needs a value (--{key} VALUE or --{key}=VALUE).")
            value, i = words[i + 1], i + 1
        settings[key] = parse_value(value)
        i += 1
    return settings


def _set_pairs(items: Sequence[str]) -> dict[str, Any]:
    settings = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--set takes KEY=VALUE (e.g. --set network_def#hidden_size=384), got {item!r}.")
        settings[key] = parse_value(value)
    return settings


def _common(sub: argparse.ArgumentParser, data_help: str, out_help: str) -> None:
    sub.add_argument("--data", metavar="DIR", required=True, help=data_help)
    sub.add_argument("--out", metavar="RUN", required=True, help=out_help)
    sub.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    config_help = "JSON file of bundle settings layered after the bundle's configs (repeatable)"
    sub.add_argument("--config", metavar="FILE", action="append", default=[], help=config_help)
    set_help = "any bundle setting, e.g. --set network_def#hidden_size=384 (repeatable)"
    sub.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="set_", help=set_help)
    sub.add_argument("--dry-run", action="store_true", help="print the equivalent python -m monai.bundle run command")


def _training(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--epochs", type=int, help="max_epochs")
    sub.add_argument("--modality", choices=MODALITIES, help="data preset (default ct; for fine-tuning: the file's)")
    sub.add_argument("--preprocessed", metavar="DIR", help="train from a folder written by monai-mae preprocess")
    multi_help = "layer multi_gpu_train.json (run as torchrun --nproc_per_node N -m monai_mae ...)"
    sub.add_argument("--multi-gpu", action="store_true", help=multi_help)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``monai-mae`` (bundle settings beyond the flags are left for :func:`_pairs`)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="MAE pretraining and segmentation fine-tuning on CT and MRI (MONAI bundles).",
        epilog="Bundle settings: --config FILE, --set KEY=VALUE, or trailing --KEY VALUE. See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"monai-mae {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    kw = {"allow_abbrev": False}
    subs.add_parser("synth", help="synthetic CT phantoms and datalist.json", add_help=False)
    subs.add_parser("preprocess", help="preprocess a dataset once, for training", add_help=False)

    sub = subs.add_parser("pretrain", help="MAE pretraining (bundle mae_pretrain)", **kw)
    _common(sub, "dataset folder with datalist.json", "run folder: models/, checkpoints/, tensorboard/, pictures")
    _training(sub)

    sub = subs.add_parser("finetune", help="segmentation fine-tuning (bundle mae_finetune)", **kw)
    _common(sub, "dataset folder with a labelled datalist.json", "run folder")
    _training(sub)
    sub.add_argument(
        "--pretrained", metavar="FILE", help="model file of a pretraining run, or nnssl checkpoint_final.pth"
    )
    sub.add_argument("--architecture", help="segmentation network: vitseg (default), unetr, ...")

    sub = subs.add_parser("evaluate", help="Dice of a fine-tuned run on a labelled list (writes RUN/eval/)", **kw)
    _common(sub, "dataset folder with a labelled datalist.json", "the fine-tuning run folder")
    sub.add_argument("--ckpt", metavar="FILE", help="model file (default: RUN/models/model_best.pt, else model.pt)")

    sub = subs.add_parser("infer", help="segmentations (or MAE reconstructions) of a datalist's images", **kw)
    _common(sub, "dataset folder with datalist.json", "the run folder (its model; outputs go there)")
    sub.add_argument("--ckpt", metavar="FILE", help="model file (default: RUN/models/model_best.pt, else model.pt)")
    sub.add_argument("--bundle", choices=BUNDLE_NAMES, help="bundle whose inference.json runs (default: the file's)")

    sub = subs.add_parser("export", help="write a run as a MONAI model-zoo bundle or an nnssl checkpoint", **kw)
    sub.add_argument("run", metavar="RUN", help="run folder (output_dir of pretrain / finetune)")
    sub.add_argument("out", metavar="OUT", help="new bundle folder")
    sub.add_argument("--format", default="bundle", help="bundle (MONAI model zoo) or nnssl (checkpoint_final.pth)")
    sub.add_argument("--ckpt", metavar="FILE", help="model file to export (default: the run's best, else final)")
    sub.add_argument("--name", help="bundle name (default: OUT's folder name)")
    return parser


def _check_file_settings(ckpt: Path, settings: dict[str, Any]) -> None:
    """Settings the model file decides (:data:`FILE_DECIDES`) must equal its values; ValueError naming both."""
    preset = read_model(ckpt, mmap=True).data_preset or {}
    for key in FILE_DECIDES:
        if key in settings and key in preset and settings[key] != preset[key]:
            raise ValueError(
                f"{key}={settings[key]!r} (given) vs {key}={preset[key]!r} (in '{ckpt}'): the model file decides "
                f"{key}; leave it out."
            )


def _abs(path: str | os.PathLike[str] | None) -> str | None:
    """An absolute path (the run records where its data and files were), or None."""
    return None if path is None else os.path.abspath(path)


def bundle_call(args: argparse.Namespace, extra: Sequence[str]) -> BundleCall:
    """The bundle, config files and settings of a parsed bundle command.

    Raises:
        ValueError: for malformed ``--set`` / trailing settings, or a setting that contradicts the model file.
        FileNotFoundError: for a missing ``--config`` file, or no model file for evaluate / infer.
    """
    for path in args.config:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--config file not found: '{path}'.")
    flags: dict[str, Any] = {"dataset_dir": _abs(args.data), "output_dir": _abs(args.out), "device": args.device}
    command = args.command
    if command in ("pretrain", "finetune"):
        bundle = "mae_pretrain" if command == "pretrain" else "mae_finetune"
        files = ["train.json"] + (["multi_gpu_train.json"] if args.multi_gpu else [])
        flags.update(max_epochs=args.epochs, modality=args.modality, preprocessed_dir=_abs(args.preprocessed))
        if command == "finetune":
            flags.update(pretrained_ckpt=_abs(args.pretrained), architecture=args.architecture)
    else:
        ckpt = run_model_file(args.out, args.ckpt)
        flags["ckpt_path"] = _abs(ckpt)
        if command == "evaluate":
            bundle, files = "mae_finetune", ["train.json", "evaluate.json"]
        else:
            recorded = (read_model(ckpt, mmap=True).run or {}).get("bundle")
            bundle = args.bundle or (recorded if recorded in BUNDLE_NAMES else "mae_finetune")
            files = ["inference.json"]
    settings = {k: v for k, v in flags.items() if v is not None}
    settings.update(_set_pairs(args.set_))
    settings.update(_pairs(extra))
    if command in ("evaluate", "infer"):
        _check_file_settings(Path(settings["ckpt_path"]), settings)
    return BundleCall(command, bundle, files, [str(Path(p).resolve()) for p in args.config], settings)


def _record(call: BundleCall, argv: Sequence[str]) -> None:
    """Write ``RUN/run_settings.json``: the command, its bundle, config files and settings (rank 0 only)."""
    if os.environ.get("RANK", "0") != "0":
        return
    from_files: dict[str, Any] = {}
    for path in call.user_files:
        from_files.update(json.loads(Path(path).read_text()))
    content = {
        "monai_mae": __version__,
        "command": shlex.join([PROG, *argv]),
        "bundle": call.bundle,
        "config_files": call.bundle_files + call.user_files,
        "settings": {**from_files, **call.settings},
    }
    path = Path(call.settings["output_dir"]) / RUN_SETTINGS_NAME
    atomic_write(path, lambda f: f.write(json.dumps(content, indent=2, default=str) + "\n"), mode="w")


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``monai-mae`` with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 when the bundle run stops on bad input (one line on stderr names it).

    Raises:
        SystemExit: status 2 for bad arguments or settings found before the run (the message names them), 0 for
            ``--help`` / ``--version``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _FORWARDED:
        return _FORWARDED[argv[0]](argv[1:], prog=f"{PROG} {argv[0]}")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    name = f"{PROG} {args.command}"
    try:
        if args.command == "export":
            if extra:
                raise ValueError(f"unrecognized arguments: {' '.join(extra)}")
            out = export_run(args.run, args.out, format=args.format, ckpt=args.ckpt, name=args.name)
            if args.format == "nnssl":
                print(f"wrote the nnssl checkpoint {out / 'checkpoint_final.pth'} (and adaptation_plan.json)")
            else:
                print(f"wrote the bundle {out} (configs/, models/model.pt, docs/README.md, LICENSE)")
            return 0
        call = bundle_call(args, extra)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"{name}: error: {err}\n")
    if args.dry_run:
        print(call.shell())
        return 0
    if call.command in ("pretrain", "finetune"):
        _record(call, argv)
    try:
        bundle_run(**call.run_kwargs())
    except Exception as err:
        cause = _root_cause(err)
        if isinstance(cause, (ValueError, FileNotFoundError)):
            print(f"{name}: error: {cause}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
