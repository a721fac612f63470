"""Which defaults hold on both phantom settings? The visible-patch term and the fine-tuning network, through the bundles.

Every arm runs the repository's bundles exactly as a user would (``python -m monai.bundle run`` with the demo
overrides, 64^3 crops, 2 CPU threads), on one of two data settings:

* ``phantoms``: the anatomical phantoms of ``make demo`` (96 x 96 x 64 voxels, 1.5 x 1.5 x 2 mm, 4 organs);
* ``realistic``: the abdominal-CT-like phantoms (:mod:`monai_mae.data.realistic`: body, table and air, 5 organs
  that are a small share of the volume, CT texture and noise, partial-volume edges, 4.1 x 4.1 x 5.8 mm voxels of a
  life-sized patient), resampled by the bundles to 3.5 mm.

Arms, each on both settings (seed 0; ``--seed`` repeats them with another seed of pretraining and fine-tuning):

* pretraining, ``mae_vit`` (the bundle's ViT MAE: width 192, 4 blocks, 8^3 patches) or ``mim_unet``
  (``configs/mim_cnn.json``: the UNet fine-tuned later, 8^3 masks), each with ``visible_loss_weight`` 0 and 1:
  the masked-patch MSE of the validation volumes relative to filling each masked patch with the mean
  (``inference.json``'s ``reconstruction_error.json``; lower is better);
* fine-tuning with ``mae_finetune --pretrained_ckpt`` alone from each of those (``vitseg`` from the ViT MAE,
  ``unet`` from the masked-image UNet), and from scratch (``unet``; ``vitseg`` with the MAE's encoder size), for
  ``--steps`` optimizer steps (6 training volumes, 1 volume x 2 crops per step), validation Dice every
  ``--steps // 4`` steps: the learning curve.

Results: ``benchmarks/results/defaults_evidence.{json,md}`` (every run: setting, arm, Dice per validation, per
organ, training loss per epoch, minutes). Runs already in the JSON are not repeated (``--fresh`` repeats them).
About 90 minutes on 2 CPU cores. ``python benchmarks/defaults_evidence.py [--settings phantoms realistic] [--seed 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_common import RESULTS  # noqa: E402

from monai_mae.data import write_synthetic_dataset  # noqa: E402
from monai_mae.data.realistic import realistic_spacing  # noqa: E402

SETTINGS = ("phantoms", "realistic")
PRETRAININGS = ("mae_vit", "mim_unet")
VISIBLE_WEIGHTS = (0.0, 1.0)
#: The ViT MAE's size at demo scale; a ViTSeg from scratch gets the same encoder.
VIT = {"hidden_size": 192, "mlp_dim": 768, "num_layers": 4, "num_heads": 4}
REALISTIC_SHAPE = (96, 96, 48)
REALISTIC_PIXDIM = [3.5, 3.5, 3.5]
#: The bundles' ``data_preset`` for the realistic phantoms: the CT preset resampled to ``REALISTIC_PIXDIM``.
REALISTIC_PRESET = f"$dict(monai_mae.data.load_data_preset('ct'), pixdim={REALISTIC_PIXDIM})"
EPOCH_LINE = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- train_loss: ([0-9.eE+-]+)")
METRICS_LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)$")


def make_data(setting: str, folder: Path) -> Path:
    """Write the setting's 8 phantoms (6 training, 2 validation) unless they are there."""
    if (folder / "datalist.json").is_file():
        return folder
    if setting == "phantoms":
        write_synthetic_dataset(folder, num=8, num_validation=2, layout="anatomical")
    else:
        write_synthetic_dataset(
            folder, num=8, num_validation=2, shape=REALISTIC_SHAPE, spacing=realistic_spacing(REALISTIC_SHAPE),
            style="realistic", num_organs=5,
        )  # fmt: skip
    return folder


def config_paths(name: str, configs: list[str], overrides: dict[str, Any], override_file: Path) -> list[str]:
    """The config files of a run in layering order: ``configs`` (a bare name is one of the bundle's, a path is
    relative to the repository), then ``overrides``, written to ``override_file``."""
    override_file.write_text(json.dumps(overrides, indent=1))
    root = REPO / "bundles" / name
    return [str(root / "configs" / c) if "/" not in c else str(REPO / c) for c in configs] + [str(override_file)]


def bundle(
    name: str, configs: list[str], overrides: dict[str, Any], args: list[str], log: Path, minutes: float | None = None
) -> str:
    """Run one bundle config list with an overrides file; return its log (raises on failure).

    With ``minutes``, a run still going after that long is stopped and the log it wrote so far is returned, with a
    last line ``STOPPED after <minutes> minutes``.
    """
    override_file = log.with_suffix(".overrides.json")
    root = REPO / "bundles" / name
    config_files = config_paths(name, configs, overrides, override_file)
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(config_files), "--bundle_root", str(root),
        "--meta_file", str(root / "configs" / "metadata.json"), "--logging_file", str(root / "configs" / "logging.conf"),
        *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=None if minutes is None else minutes * 60,
        )
    except subprocess.TimeoutExpired as stopped:
        text = "".join(o.decode() if isinstance(o, bytes) else (o or "") for o in (stopped.stdout, stopped.stderr))
        text += f"\nSTOPPED after {minutes:g} minutes\n"
        log.write_text(text)
        return text
    log.write_text(result.stdout + result.stderr)
    if result.returncode:
        raise RuntimeError(f"{name} {configs} failed (log: {log}):\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout + result.stderr


def curves(text: str, steps_per_epoch: int) -> tuple[list[dict], list[dict]]:
    """Validation metrics and the last training loss of every epoch, against optimizer steps, from a log."""
    losses: dict[int, float] = {}
    for epoch, _, _, loss in EPOCH_LINE.findall(text):
        losses[int(epoch)] = float(loss)
    validations = []
    for line in text.splitlines():
        match = METRICS_LINE.search(line)
        if match and "val_mean_dice" in match.group(2):
            values = dict(re.findall(r"(\w+): ([0-9.eE+-]+|nan)", match.group(2)))
            validations.append(
                {"step": int(match.group(1)) * steps_per_epoch, **{k: float(v) for k, v in values.items()}}
            )
    train = [{"step": e * steps_per_epoch, "train_loss": v} for e, v in sorted(losses.items())]
    return validations, train


def pretrain(
    setting: str, kind: str, weight: float, data: Path, out: Path, epochs: int, seed: int = 0
) -> dict[str, Any]:
    configs = ["train.json"] + (["mim_cnn.json"] if kind == "mim_unet" else [])
    overrides: dict[str, Any] = dict(
        roi_size=[64, 64, 64], patch_size=[8, 8, 8], max_epochs=epochs, batch_size=2, num_samples=2, num_workers=2,
        cache="cache", lr=1e-3, warmup_epochs=2, val_interval=epochs, progress_bar=False, resume=False,
        visible_loss_weight=weight, seed=seed,
    )  # fmt: skip
    if kind == "mae_vit":
        overrides.update({f"network_def#{k}": v for k, v in VIT.items()})
        overrides.update({"network_def#decoder_hidden_size": 128, "network_def#decoder_mlp_dim": 512,
                          "network_def#decoder_num_layers": 2, "network_def#decoder_num_heads": 4})  # fmt: skip
    if setting == "realistic":
        overrides["data_preset"] = REALISTIC_PRESET
    minutes, error = pretrain_and_score(configs, overrides, data, out)
    return {"pretrain_minutes": minutes, **{k: error[k] for k in ("masked_mse", "mean_fill_mse", "masked_mse_ratio")}}


def pretrain_and_score(
    configs: list[str], overrides: dict[str, Any], data: Path, out: Path
) -> tuple[float, dict[str, Any]]:
    """Run ``mae_pretrain`` with ``configs`` + ``overrides`` into ``out``, then its ``inference.json``.

    Returns the pretraining's minutes (rounded to 0.01) and ``out/reconstruction_error.json`` as written by the
    inference (masked-patch MSE next to the mean fill's).
    """
    args = ["--dataset_dir", str(data), "--output_dir", str(out)]
    start = time.perf_counter()
    bundle("mae_pretrain", configs, overrides, args, out.with_name(out.name + "_train.log"))
    minutes = round((time.perf_counter() - start) / 60, 2)
    bundle("mae_pretrain", ["inference.json"], {"num_workers": 0}, args, out.with_name(out.name + "_infer.log"))
    return minutes, json.loads((out / "reconstruction_error.json").read_text())


def finetune(
    setting: str, architecture: str, pretrained: Path | None, data: Path, out: Path, steps: int, seed: int = 0
) -> dict:
    steps_per_epoch = 6  # 6 training volumes, one per step
    epochs = max(1, steps // steps_per_epoch)
    overrides: dict[str, Any] = dict(
        roi_size=[64, 64, 64], max_epochs=epochs, batch_size=1, num_samples=2, num_workers=2, cache="cache",
        lr=1e-3, warmup_epochs=2, val_interval=max(1, epochs // 4), sw_batch_size=2, progress_bar=False,
        resume=False, architecture=architecture, seed=seed,
    )  # fmt: skip
    if pretrained is None and architecture == "vitseg":
        overrides["encoder"] = {k: v for k, v in VIT.items()}
    if setting == "realistic":
        overrides["num_classes"] = 6  # background and 5 organs
        if pretrained is None:  # a pretrained file carries its preset
            overrides["data_preset"] = REALISTIC_PRESET
    args = ["--dataset_dir", str(data), "--output_dir", str(out)]
    if pretrained is not None:
        args += ["--pretrained_ckpt", str(pretrained)]
    start = time.perf_counter()
    text = bundle("mae_finetune", ["train.json"], overrides, args, out.with_name(out.name + "_train.log"))
    minutes = (time.perf_counter() - start) / 60
    validations, train = curves(text, steps_per_epoch)
    best = max(validations, key=lambda v: v["val_mean_dice"]) if validations else {}
    return {"steps": epochs * steps_per_epoch, "finetune_minutes": round(minutes, 2), "best_dice": best.get("val_mean_dice"),
            "final_dice": validations[-1]["val_mean_dice"] if validations else None, "validations": validations,
            "train_loss": train}  # fmt: skip


def arms(settings: list[str], seed: int = 0) -> list[dict[str, Any]]:
    runs = []
    for setting in settings:
        for kind, architecture in (("mim_unet", "unet"), ("mae_vit", "vitseg")):
            runs.append({"setting": setting, "seed": seed, "pretraining": "none", "visible_loss_weight": None,
                         "architecture": architecture})  # fmt: skip
            for weight in VISIBLE_WEIGHTS:
                runs.append({"setting": setting, "seed": seed, "pretraining": kind, "visible_loss_weight": weight,
                             "architecture": architecture})  # fmt: skip
    return runs


def key(run: dict[str, Any]) -> str:
    """A run's identity; seed 0 (and rows written before seeds were recorded) keeps the key it always had."""
    base = f"{run['setting']}/{run['pretraining']}/{run['visible_loss_weight']}/{run['architecture']}"
    return base + (f"/seed{run['seed']}" if run.get("seed") else "")


def seed_suffix(seed: int) -> str:
    """Folder-name suffix of a seed: none for 0 (the folders of the first runs), ``_s<seed>`` otherwise."""
    return f"_s{seed}" if seed else ""


def report(results: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Defaults on both phantom settings: the visible-patch term and the fine-tuning network",
        "",
        f"`{command}` (2 CPU threads; bundles with the demo overrides, 64^3 crops; the seed of pretraining and fine-tuning",
        "per row). Masked-patch MSE relative to filling each masked patch with the mean of the visible voxels: lower is",
        "better, 1 = nothing learned.",
        "",
        "| setting | seed | pretraining | visible_loss_weight | masked MSE / mean fill | fine-tuned | Dice per validation (steps) | best Dice | minutes (pretrain + fine-tune) |",
        "| --- | ---: | --- | ---: | ---: | --- | --- | ---: | ---: |",
    ]  # fmt: skip
    for r in results:
        ratio = "-" if r.get("masked_mse_ratio") is None else f"{r['masked_mse_ratio']:.3f}"
        weight = "-" if r["visible_loss_weight"] is None else f"{r['visible_loss_weight']:g}"
        curve = ", ".join(f"{v['val_mean_dice']:.3f} ({v['step']})" for v in r.get("validations", []))
        best = "-" if r.get("best_dice") is None else f"{r['best_dice']:.3f}"
        minutes = r.get("pretrain_minutes", 0) + r.get("finetune_minutes", 0)
        lines.append(f"| {r['setting']} | {r.get('seed', 0)} | {r['pretraining']} | {weight} | {ratio} | {r['architecture']} | {curve} | "
                     f"{best} | {minutes:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_results(out: Path, command: str, results: list[dict[str, Any]], reporter: Any) -> None:
    """``out`` (JSON: the command and every run) and the markdown ``reporter(results, command)`` next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "runs": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(reporter(results, command))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=252, help="fine-tuning steps (default 252: 42 epochs of 6)")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "defaults_evidence")
    parser.add_argument("--out", type=Path, default=RESULTS / "defaults_evidence.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of pretraining and fine-tuning (default 0)")
    parser.add_argument("--fresh", action="store_true", help="repeat runs already in --out")
    args = parser.parse_args(argv)
    command = "python benchmarks/defaults_evidence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    done = {} if args.fresh or not args.out.is_file() else {key(r): r for r in json.loads(args.out.read_text())["runs"]}
    results = list(done.values())
    for run in arms(args.settings, args.seed):
        if key(run) in done:
            continue
        folder = args.work_dir / run["setting"]
        data = make_data(run["setting"], folder / "data")  # the same phantoms for every seed
        name = f"{run['pretraining']}_w{run['visible_loss_weight']}_{run['architecture']}{seed_suffix(args.seed)}"
        row = dict(run)
        pretrained = None
        if run["pretraining"] != "none":
            pre_out = folder / f"pre_{run['pretraining']}_w{run['visible_loss_weight']}{seed_suffix(args.seed)}"
            row.update(pretrain(run["setting"], run["pretraining"], run["visible_loss_weight"], data, pre_out,
                                args.pretrain_epochs, args.seed))  # fmt: skip
            pretrained = pre_out / "models" / "model.pt"
        row.update(finetune(run["setting"], run["architecture"], pretrained, data, folder / f"ft_{name}", args.steps,
                            args.seed))  # fmt: skip
        results.append(row)
        print(f"{key(run)}: ratio {row.get('masked_mse_ratio')}, best Dice {row['best_dice']}", flush=True)
        write_results(args.out, command, results, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
