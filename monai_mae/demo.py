"""The one-line summaries that ``make demo`` and ``make demo-finetune`` end with.

``python -m monai_mae.demo pretrain RUN`` reads ``RUN/reconstruction_error.json`` (written by the
``mae_pretrain`` bundle's ``inference.json``) and ``python -m monai_mae.demo finetune RUN`` reads
``RUN/eval/metrics.json`` (the ``mae_finetune`` bundle's ``evaluate.json``); each prints one plain line with
the figure and the pictures to look at, and exits with status 1 when the figure misses the demo's target
(``--target``), so a broken demo does not pass silently.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PRETRAIN_TARGET", "FINETUNE_TARGET", "pretrain_summary", "finetune_summary", "main"]

#: ``make demo`` passes when the masked-patch MSE is at most this fraction of the mean fill's.
PRETRAIN_TARGET = 0.5
#: ``make demo-finetune`` passes when the validation mean Dice is at least this.
FINETUNE_TARGET = 0.6


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run {what} first.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None


def pretrain_summary(run_dir: str | Path, target: float = PRETRAIN_TARGET) -> tuple[str, bool]:
    """The pretraining demo's line and whether it met ``target``.

    Args:
        run_dir: the ``mae_pretrain`` output folder after ``train.json`` and ``inference.json``.
        target: the largest masked-patch MSE relative to the mean fill that passes.

    Returns:
        ``(line, passed)``.

    Raises:
        FileNotFoundError: when ``RUN/reconstruction_error.json`` is missing (the message says what to run).
        ValueError: when it is not valid JSON or lacks ``masked_mse_ratio``.
    """
    run = Path(run_dir)
    results = _read_json(run / "reconstruction_error.json", "the mae_pretrain bundle's inference.json")
    if "masked_mse_ratio" not in results:
        raise ValueError(f"{run / 'reconstruction_error.json'} has no 'masked_mse_ratio'.")
    ratio = float(results["masked_mse_ratio"])
    passed = math.isfinite(ratio) and ratio <= target
    line = (
        f"Pretraining demo: on {results.get('volumes', '?')} validation phantoms the masked patches are filled in "
        f"with {ratio:.2f} x the squared error of filling them with the mean (target <= {target:g}: "
        f"{'met' if passed else 'MISSED'}). Pictures: {run / 'reconstructions' / 'latest.png'}; "
        f"volumes: {run / 'reconstructions_nifti'}/"
    )
    return line, passed


def finetune_summary(run_dir: str | Path, target: float = FINETUNE_TARGET) -> tuple[str, bool]:
    """The fine-tuning demo's line and whether it met ``target``.

    Args:
        run_dir: the ``mae_finetune`` output folder after ``train.json`` and ``evaluate.json``.
        target: the smallest validation mean Dice that passes.

    Returns:
        ``(line, passed)``.

    Raises:
        FileNotFoundError: when ``RUN/eval/metrics.json`` is missing (the message says what to run).
        ValueError: when it is not valid JSON or lacks ``val_mean_dice``.
    """
    run = Path(run_dir)
    path = run / "eval" / "metrics.json"
    results = _read_json(path, "the mae_finetune bundle's evaluate.json")
    metrics = results.get("metrics", results)
    if "val_mean_dice" not in metrics:
        raise ValueError(f"{path} has no 'val_mean_dice'.")
    dice = float(metrics["val_mean_dice"])
    passed = math.isfinite(dice) and dice >= target
    per_class = {k[len("val_dice_") :]: float(v) for k, v in metrics.items() if k.startswith("val_dice_")}
    organs = ", ".join(f"{name} {value:.2f}" for name, value in per_class.items())
    cases = results.get("num_cases", "?")
    line = (
        f"Fine-tuning demo: validation mean Dice {dice:.3f} on {cases} phantoms"
        f"{f' ({organs})' if organs else ''} (target >= {target:g}: {'met' if passed else 'MISSED'}). "
        f"Pictures: {run / 'overlays' / 'latest.png'}; segmentations: {run / 'segmentations'}/"
    )
    return line, passed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_mae.demo {pretrain,finetune} RUN [--target T]``: print the line; 1 when missed."""
    parser = argparse.ArgumentParser(prog="python -m monai_mae.demo", description=__doc__.splitlines()[0])
    parser.add_argument("demo", choices=("pretrain", "finetune"))
    parser.add_argument("run_dir", help="the demo's output folder")
    parser.add_argument("--target", type=float, default=None, help="the figure that passes (default: the demo's)")
    args = parser.parse_args(argv)
    summary = pretrain_summary if args.demo == "pretrain" else finetune_summary
    default = PRETRAIN_TARGET if args.demo == "pretrain" else FINETUNE_TARGET
    line, passed = summary(args.run_dir, default if args.target is None else args.target)
    print(line)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
