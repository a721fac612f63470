"""Learning curves of every fine-tuning architecture: training loss and validation Dice against steps.

Each arm is ``make demo-finetune ARCH=<architecture>`` run longer: ``mae_finetune``'s ``train.json`` with
``configs/demo_finetune_cpu.json`` (64^3 crops, one volume x 2 crops per step, lr 1e-3 after 12 warm-up steps; a
ViT encoder of width 192, 12 blocks, 4 heads), on one of :mod:`defaults_evidence`'s settings (6 training and
2 validation phantoms), for ``--steps`` optimizer steps with the validation Dice every ``--steps // 4`` steps
(252 / 504 / 756 / 1008 by default) and the training loss of every epoch.

Pretrained arms (``unet_mim*``) are ``make demo`` then ``make demo-finetune`` run longer on the same phantoms: the
UNet pretrained by masked-image modelling with ``configs/demo_pretrain_cpu.json`` (``unet_mim``), for 4 times
the epochs (``unet_mim_long``), or fine-tuned with its pretrained layers at 0.3 x the learning rate
(``unet_mim_lr0.3``); a pretraining is reused by every arm that names it, and its masked-patch error relative to
the mean fill is recorded. The pretrained and the scratch UNet are one network, so equal steps are equal
fine-tuning wall-clock. ``--seed`` repeats an arm with another seed (crops, augmentation and initialisation).

Two more arms ask why ViTSeg learns slowly: is it the demo's learning rate (ViTSeg at the bundle's own ``lr``
3e-4 with 10 warm-up epochs, ``vitseg_lr3e-4``), or the resolution its decoder sees (the hybrid whose
convolutional stem on the image feeds the last two decoder stages, ``vitseg#conv_skips``, ``vitseg_conv_skips``)?

``--minutes`` caps each arm: an arm still running then is stopped and keeps the validations it reached (its row
says ``stopped``); its newest epoch checkpoint is then scored by the bundle's own evaluator and added as one more
validation (``"checkpoint": true``; ``--score-stopped`` does it for arms already in the results).

Results: ``benchmarks/results/learning_curves.{json,md}``; arms already there are not repeated (``--fresh`` repeats
them). ``--plot benchmarks/figures/learning_curves.png`` draws them. Two ``--arms`` lists can run side by side with
``OMP_NUM_THREADS=1``.

``python benchmarks/learning_curves.py [--setting realistic] [--arms unet vitseg ...] [--steps 1008]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import defaults_evidence as de  # noqa: E402
from bench_common import RESULTS  # noqa: E402

STEPS_PER_EPOCH = 6  # 6 training volumes, one per step
CONFIGS = ["train.json", "configs/demo_finetune_cpu.json"]  # mae_finetune's, then the demo's overrides
PRETRAIN_CONFIGS = ["train.json", "mim_cnn.json", "configs/demo_pretrain_cpu.json"]  # make demo's
#: Pretraining name -> overrides on top of ``make demo``'s.
PRETRAININGS: dict[str, dict[str, Any]] = {"demo": {}, "long": {"max_epochs": 120, "val_interval": 40}}
#: Arm name -> (architecture, overrides on top of the demo's, pretraining name or None for scratch).
ARMS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "unet": ("unet", {}, None),
    "segresnet": ("segresnet", {}, None),
    "dynunet": ("dynunet", {}, None),
    "vitseg": ("vitseg", {}, None),
    "unetr": ("unetr", {}, None),
    "vitseg_lr3e-4": ("vitseg", {"lr": 3e-4, "warmup_epochs": 10}, None),
    "vitseg_conv_skips": ("vitseg", {"vitseg#conv_skips": True}, None),
    "unet_mim": ("unet", {}, "demo"),
    "unet_mim_lr0.3": ("unet", {"encoder_lr_scale": 0.3}, "demo"),
    "unet_mim_long": ("unet", {}, "long"),
}


def overrides_for(arm: str, setting: str, steps: int, seed: int = 0, pretrained: Path | None = None) -> dict[str, Any]:
    """The bundle overrides of one arm (on top of ``configs/demo_finetune_cpu.json``)."""
    architecture, extra, _ = ARMS[arm]
    epochs = max(4, steps // STEPS_PER_EPOCH)
    overrides: dict[str, Any] = {
        "architecture": architecture, "max_epochs": epochs, "val_interval": max(1, epochs // 4), "resume": False,
        "synthetic_if_missing": False, "seed": seed, **extra,
    }  # fmt: skip
    if pretrained is not None:  # the model file carries the network's options and the data preset
        overrides["pretrained_ckpt"] = str(pretrained)
    if setting == "realistic":
        overrides["num_classes"] = 6  # background and 5 organs
        if pretrained is None:
            overrides["data_preset"] = de.REALISTIC_PRESET
    return overrides


def pretrain(pretraining: str, setting: str, data: Path, out: Path) -> dict[str, Any]:
    """``make demo``'s masked-image pretraining (with ``PRETRAININGS[pretraining]``) into ``out``, unless it is there.

    Returns ``{"pretrained_ckpt", "masked_mse_ratio", "pretrain_minutes"}`` (minutes None for a reused run).
    """
    model, error_file = out / "models" / "model.pt", out / "reconstruction_error.json"
    if model.is_file() and error_file.is_file():
        minutes, error = None, json.loads(error_file.read_text())
    else:
        overrides: dict[str, Any] = {"synthetic_if_missing": False, "resume": False, **PRETRAININGS[pretraining]}
        if setting == "realistic":
            overrides["data_preset"] = de.REALISTIC_PRESET
        minutes, error = de.pretrain_and_score(PRETRAIN_CONFIGS, overrides, data, out)
    return {"pretrained_ckpt": str(model), "masked_mse_ratio": error["masked_mse_ratio"], "pretrain_minutes": minutes}


def run_arm(
    arm: str, setting: str, data: Path, out: Path, steps: int, minutes: float | None, seed: int = 0,
    pretrained: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune one arm; its curves, best Dice, minutes and whether the cap stopped it."""
    overrides = overrides_for(arm, setting, steps, seed, pretrained)
    args = ["--dataset_dir", str(data), "--output_dir", str(out)]
    start = time.perf_counter()
    text = de.bundle(
        "mae_finetune", CONFIGS, overrides, args, out.with_name(out.name + "_train.log"), minutes=minutes
    )  # fmt: skip
    elapsed = (time.perf_counter() - start) / 60
    validations, train = de.curves(text, STEPS_PER_EPOCH)
    stopped = "STOPPED after" in text
    if stopped:  # the epochs trained after the last validation still count
        add_if_later(validations, score_checkpoint(arm, setting, data, out, steps, seed, pretrained))
    best = max(validations, key=lambda v: v["val_mean_dice"]) if validations else {}
    return {
        "setting": setting, "arm": arm, "seed": seed, "architecture": ARMS[arm][0], "pretraining": ARMS[arm][2],
        "planned_steps": overrides["max_epochs"] * STEPS_PER_EPOCH,
        "stopped": stopped, "minutes": round(elapsed, 2), "best_dice": best.get("val_mean_dice"),
        "validations": validations, "train_loss": train,
        "lr": overrides.get("lr", 1e-3), "warmup_epochs": overrides.get("warmup_epochs", 2),
        "encoder_lr_scale": overrides.get("encoder_lr_scale", 1.0),
    }  # fmt: skip


def last_checkpoint(out: Path) -> tuple[Path, int] | None:
    """The newest ``checkpoint_epoch=N.pt`` of a run's output folder and its epoch, or None."""
    found = [(int(p.stem.split("=")[1]), p) for p in (out / "checkpoints").glob("checkpoint_epoch=*.pt")]
    return (max(found)[1], max(found)[0]) if found else None


def add_if_later(validations: list[dict[str, Any]], scored: dict[str, Any] | None) -> bool:
    """Append a checkpoint's ``scored`` metrics when they come after the last validation; whether they did."""
    if scored is None or (validations and scored["step"] <= validations[-1]["step"]):
        return False
    validations.append(scored)
    return True


def score_checkpoint(
    arm: str, setting: str, data: Path, out: Path, steps: int, seed: int = 0, pretrained: Path | None = None
) -> dict[str, Any] | None:
    """The validation metrics of a stopped arm's newest epoch checkpoint, through the bundle's own evaluator.

    Returns ``{"step": ..., "checkpoint": True, "val_mean_dice": ..., "val_dice_<organ>": ...}``, or None when the
    run wrote no checkpoint.
    """
    import torch
    from monai.bundle import ConfigParser

    found = last_checkpoint(out)
    if found is None:
        return None
    path, epoch = found
    override_file = out.with_name(out.name + "_score.overrides.json")
    parser = ConfigParser()
    overrides = overrides_for(arm, setting, steps, seed, pretrained)
    parser.read_config(de.config_paths("mae_finetune", CONFIGS, overrides, override_file))
    parser.update({"bundle_root": str(REPO / "bundles" / "mae_finetune"), "dataset_dir": str(data),
                   "output_dir": str(out.with_name(out.name + "_score"))})  # fmt: skip
    parser.get_parsed_content("network").load_state_dict(
        torch.load(path, map_location="cpu", weights_only=True)["network"]
    )
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    metrics = {
        k: float(v) for k, v in evaluator.state.metrics.items() if k.startswith("val_") and "class_dice" not in k
    }
    return {"step": epoch * STEPS_PER_EPOCH, "checkpoint": True, **metrics}


def run_folder(folder: Path, arm: str, seed: int) -> Path:
    """Where an arm's fine-tuning writes: ``curve_<arm>``, with ``_s<seed>`` for seeds other than 0."""
    return folder / f"curve_{arm}{de.seed_suffix(seed)}"


def run_key(row: dict[str, Any]) -> tuple[str, int, str]:
    """A result row's identity: setting, seed (0 for rows written before seeds were recorded) and arm."""
    return row["setting"], row.get("seed", 0), row["arm"]


def loss_at(train: list[dict[str, float]], step: int) -> float | None:
    """The training loss of the last epoch that ended at or before ``step``."""
    before = [t["train_loss"] for t in train if t["step"] <= step]
    return before[-1] if before else None


def report(results: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Learning curves: every fine-tuning architecture at the demo's sizes, from scratch and pretrained",
        "",
        f"`{command}` (CPU; `mae_finetune` with `configs/demo_finetune_cpu.json`). Each cell: validation mean Dice /",
        "training loss of the last epoch before it; `*`: the newest checkpoint of a stopped arm, scored by the",
        "bundle's evaluator. Pretraining: `make demo`'s masked-image UNet (`long`: 4 x the epochs) and its masked-patch",
        "MSE relative to the mean fill; fine-tuning minutes only.",
        "",
        "| setting | arm | seed | pretraining (MSE / mean fill) | lr (warm-up epochs) | validation steps: Dice / training loss "
        "| best Dice | minutes |",
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: |",
    ]
    for r in results:
        cells = ", ".join(
            f"{v['step']}{'*' if v.get('checkpoint') else ''}: {v['val_mean_dice']:.3f} / "
            f"{loss_at(r['train_loss'], v['step']) or float('nan'):.3f}"
            for v in r["validations"]
        )
        if r["stopped"]:
            last = r["train_loss"][-1]["step"] if r["train_loss"] else 0
            cells = f"{cells} (stopped at step {last} of {r['planned_steps']})".strip()
        best = "-" if r["best_dice"] is None else f"{r['best_dice']:.3f}"
        pretraining = "none" if not r.get("pretraining") else f"{r['pretraining']} ({r['masked_mse_ratio']:.3f})"
        lr = f"{r['lr']:g}" + (
            f", x{r['encoder_lr_scale']:g} pretrained" if r.get("encoder_lr_scale", 1.0) != 1 else ""
        )
        lines.append(f"| {r['setting']} | {r['arm']} | {r.get('seed', 0)} | {pretraining} | {lr} ({r['warmup_epochs']}) "
                     f"| {cells} | {best} | {r['minutes']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def draw(results: list[dict[str, Any]], path: Path) -> Path:
    """Two panels against optimizer steps, one line per arm: validation mean Dice and the training loss."""
    from monai_mae.engines.pictures import require_matplotlib

    Figure, Canvas = require_matplotlib()
    figure = Figure(figsize=(11, 4.6), dpi=100)
    Canvas(figure)
    dice, loss = figure.subplots(1, 2)
    palette = [f"C{i}" for i in range(10)]
    colors = {arm: palette[i % 10] for i, arm in enumerate(dict.fromkeys(r["arm"] for r in results))}
    for r in results:
        label = r["arm"] + (f" seed {r['seed']}" if r.get("seed") else "") + (" (stopped)" if r["stopped"] else "")
        style = dict(color=colors[r["arm"]], linestyle="--" if r.get("pretraining") else "-",  # pretrained dashed
                     alpha=0.55 if r.get("seed") else 1.0)  # other seeds: the arm's colour, fainter  # fmt: skip
        dice.plot([v["step"] for v in r["validations"]], [v["val_mean_dice"] for v in r["validations"]],
                  marker="o", linewidth=2, label=label, **style)  # fmt: skip
        loss.plot([t["step"] for t in r["train_loss"]], [t["train_loss"] for t in r["train_loss"]],
                  linewidth=1.5, label=label, **style)  # fmt: skip
    dice.set(xlabel="optimizer steps", ylabel="validation mean Dice", ylim=(0, 1),
             title="validation Dice (dashed: pretrained)")  # fmt: skip
    loss.set(xlabel="optimizer steps", ylabel="training loss (Dice + CE)", title="training loss")
    for axes in (dice, loss):
        axes.grid(alpha=0.3)
    dice.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=de.SETTINGS, default="realistic")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--steps", type=int, default=1008, help="optimizer steps (default 1008: 168 epochs of 6)")
    parser.add_argument("--minutes", type=float, default=None, help="stop an arm after this many minutes")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed (crops, augmentation, initialisation)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "defaults_evidence")
    parser.add_argument("--out", type=Path, default=RESULTS / "learning_curves.json")
    parser.add_argument("--fresh", action="store_true", help="repeat arms already in --out")
    parser.add_argument("--plot", type=Path, default=None, help="only draw the curves of --out into this PNG")
    parser.add_argument("--score-stopped", action="store_true",
                        help="only score the newest checkpoint of stopped arms in --out that lack it")  # fmt: skip
    args = parser.parse_args(argv)
    if args.plot is not None:
        draw(json.loads(args.out.read_text())["runs"], args.plot)
        return 0
    if args.score_stopped:
        saved = json.loads(args.out.read_text())
        for row in saved["runs"]:
            if not row["stopped"] or any(v.get("checkpoint") for v in row["validations"]):
                continue
            folder, seed = args.work_dir / row["setting"], row.get("seed", 0)
            pretrained = Path(row["pretrained_ckpt"]) if row.get("pretrained_ckpt") else None
            scored = score_checkpoint(row["arm"], row["setting"], folder / "data", run_folder(folder, row["arm"], seed),
                                      row["planned_steps"], seed, pretrained)  # fmt: skip
            if add_if_later(row["validations"], scored):
                row["best_dice"] = max(v["val_mean_dice"] for v in row["validations"])
                print(f"{row['setting']}/{row['arm']}: {scored['val_mean_dice']:.3f} at step {scored['step']}")
        de.write_results(args.out, saved["command"], saved["runs"], report)
        return 0
    command = "python benchmarks/learning_curves.py " + " ".join(argv if argv is not None else sys.argv[1:])
    folder = args.work_dir / args.setting
    data = de.make_data(args.setting, folder / "data")
    this = (args.setting, args.seed)
    for arm in args.arms:
        done = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
        if not args.fresh and any(run_key(r) == (*this, arm) for r in done):
            continue
        pretraining, pretrained = ARMS[arm][2], {}
        if pretraining is not None:
            pretrained = pretrain(pretraining, args.setting, data, folder / f"curve_pre_{pretraining}")
        ckpt = Path(pretrained["pretrained_ckpt"]) if pretrained else None
        row = run_arm(arm, args.setting, data, run_folder(folder, arm, args.seed), args.steps, args.minutes, args.seed,
                      ckpt)  # fmt: skip
        row.update(pretrained)
        print(f"{args.setting}/{arm}/seed {args.seed}: best Dice {row['best_dice']}, {row['minutes']} min"
              + (" (stopped)" if row["stopped"] else ""), flush=True)  # fmt: skip
        # read again: another process may have added arms meanwhile
        done = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
        results = [r for r in done if run_key(r) != (*this, arm)] + [row]
        de.write_results(args.out, command, results, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
