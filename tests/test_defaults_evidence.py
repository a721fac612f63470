"""benchmarks/defaults_evidence.py: the arms it runs, how it reads the bundles' logs, and its report."""

from __future__ import annotations

import sys
from pathlib import Path

from bundle_utils import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import defaults_evidence as de  # noqa: E402

LOG = """\
2026-12-07 05:31:02,000 - INFO - Epoch: 1/2, Iter: 5/6 -- train_loss: 2.5000
2026-12-07 05:31:03,000 - INFO - Epoch: 1/2, Iter: 6/6 -- train_loss: 2.2500
2026-12-07 05:31:09,000 - INFO - Epoch[1] Metrics -- val_dice_class_1: 0.5000 val_dice_class_2: nan val_mean_dice: 0.2500
2026-12-07 05:31:12,000 - INFO - Epoch: 2/2, Iter: 6/6 -- train_loss: 1.7500
2026-12-07 05:31:19,000 - INFO - Epoch[2] Metrics -- val_dice_class_1: 0.7000 val_dice_class_2: 0.3000 val_mean_dice: 0.5000
2026-12-07 05:31:19,500 - INFO - Epoch[2] Metrics -- val_loss: 0.1000
"""


def test_arms_cover_both_pretrainings_weights_and_scratch_per_setting():
    runs = de.arms(["phantoms", "realistic"])
    assert len(runs) == 12 and len({de.key(r) for r in runs}) == 12
    phantoms = [r for r in runs if r["setting"] == "phantoms"]
    assert {(r["pretraining"], r["visible_loss_weight"], r["architecture"]) for r in phantoms} == {
        ("none", None, "unet"), ("mim_unet", 0.0, "unet"), ("mim_unet", 1.0, "unet"),
        ("none", None, "vitseg"), ("mae_vit", 0.0, "vitseg"), ("mae_vit", 1.0, "vitseg"),
    }  # fmt: skip
    # seed 0 keeps the keys of the rows written before seeds were recorded; another seed gets its own keys
    old_row = {k: v for k, v in phantoms[1].items() if k != "seed"}
    assert de.key(phantoms[1]) == de.key(old_row) == "phantoms/mim_unet/0.0/unet"
    again = de.arms(["phantoms", "realistic"], seed=2)
    assert {r["seed"] for r in again} == {2} and not {de.key(r) for r in again} & {de.key(r) for r in runs}
    assert de.key(again[1]) == "phantoms/mim_unet/0.0/unet/seed2"
    assert (de.seed_suffix(0), de.seed_suffix(2)) == ("", "_s2")


def test_a_seed_reaches_both_bundles_and_its_own_folders(tmp_path, monkeypatch):
    calls = []

    def fake_bundle(name, configs, overrides, args, log, minutes=None):
        calls.append((name, configs[0], overrides.get("seed"), Path(args[args.index("--output_dir") + 1]).name))
        out = Path(args[args.index("--output_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "reconstruction_error.json").write_text('{"masked_mse": 1, "mean_fill_mse": 2, "masked_mse_ratio": 0.5}')
        return LOG

    monkeypatch.setattr(de, "bundle", fake_bundle)
    monkeypatch.setattr(de, "make_data", lambda setting, folder: folder)
    out = tmp_path / "evidence.json"
    assert de.main(["--settings", "phantoms", "--seed", "3", "--work-dir", str(tmp_path), "--out", str(out)]) == 0
    assert {seed for _, config, seed, _ in calls if config != "inference.json"} == {3}
    folders = {folder for *_, folder in calls}
    assert folders == {"pre_mim_unet_w0.0_s3", "pre_mim_unet_w1.0_s3", "pre_mae_vit_w0.0_s3", "pre_mae_vit_w1.0_s3",
                       "ft_none_wNone_unet_s3", "ft_mim_unet_w0.0_unet_s3", "ft_mim_unet_w1.0_unet_s3",
                       "ft_none_wNone_vitseg_s3", "ft_mae_vit_w0.0_vitseg_s3", "ft_mae_vit_w1.0_vitseg_s3"}  # fmt: skip
    rows = de.json.loads(out.read_text())["runs"]
    assert len(rows) == 6 and {r["seed"] for r in rows} == {3} and rows[0]["best_dice"] == 0.5
    assert (
        "| phantoms | 3 | none | - | - | unet | 0.250 (6), 0.500 (12) | 0.500 |" in out.with_suffix(".md").read_text()
    )


def test_curves_read_validation_dice_and_last_training_loss_per_epoch():
    validations, train = de.curves(LOG, steps_per_epoch=6)
    assert [v["step"] for v in validations] == [6, 12] and [v["val_mean_dice"] for v in validations] == [0.25, 0.5]
    assert (
        validations[0]["val_dice_class_1"] == 0.5
        and validations[0]["val_dice_class_2"] != validations[0]["val_dice_class_2"]
    )  # nan kept as nan
    assert train == [{"step": 6, "train_loss": 2.25}, {"step": 12, "train_loss": 1.75}]


def test_report_lists_every_run_with_its_curve():
    rows = [
        {"setting": "phantoms", "pretraining": "mim_unet", "visible_loss_weight": 0.0, "architecture": "unet",
         "masked_mse_ratio": 0.4656, "validations": [{"step": 60, "val_mean_dice": 0.267}], "best_dice": 0.736,
         "pretrain_minutes": 1.5, "finetune_minutes": 2.75},
        {"setting": "phantoms", "pretraining": "none", "visible_loss_weight": None, "architecture": "unet",
         "validations": [], "best_dice": None, "finetune_minutes": 3.6},
    ]  # fmt: skip
    text = de.report(rows, "python benchmarks/defaults_evidence.py")
    assert "| phantoms | 0 | mim_unet | 0 | 0.466 | unet | 0.267 (60) | 0.736 | 4.2 |" in text  # no seed recorded: 0
    assert "| phantoms | 0 | none | - | - | unet |  | - | 3.6 |" in text


def test_bundle_keeps_the_log_of_a_run_stopped_by_its_cap(tmp_path, monkeypatch):
    def stopped(command, **kwargs):
        assert kwargs["timeout"] == 90.0
        raise de.subprocess.TimeoutExpired(command, kwargs["timeout"], output=LOG.encode(), stderr=None)

    monkeypatch.setattr(de.subprocess, "run", stopped)
    text = de.bundle("mae_finetune", ["train.json"], {"max_epochs": 2}, [], tmp_path / "arm.log", minutes=1.5)
    assert text.startswith(LOG) and text.rstrip().endswith("STOPPED after 1.5 minutes")
    assert (tmp_path / "arm.log").read_text() == text
    assert de.curves(text, steps_per_epoch=6)[0][-1]["val_mean_dice"] == 0.5


def test_learning_curve_arms_override_the_demo_recipe_per_setting():
    import learning_curves as lc

    realistic = lc.overrides_for("vitseg_lr3e-4", "realistic", 1008)
    assert realistic["architecture"] == "vitseg" and realistic["max_epochs"] == 168 and realistic["val_interval"] == 42
    assert realistic["lr"] == 3e-4 and realistic["warmup_epochs"] == 10 and realistic["num_classes"] == 6
    assert "pixdim=[3.5, 3.5, 3.5]" in realistic["data_preset"] and realistic["synthetic_if_missing"] is False
    phantoms = lc.overrides_for("unet", "phantoms", 252)
    assert phantoms["max_epochs"] == 42 and phantoms["val_interval"] == 10
    assert "lr" not in phantoms and "num_classes" not in phantoms and "data_preset" not in phantoms
    assert phantoms["seed"] == 0 and "pretrained_ckpt" not in phantoms


def test_pretrained_arms_take_the_model_file_and_its_preset(tmp_path):
    import learning_curves as lc

    model = tmp_path / "models" / "model.pt"
    slow = lc.overrides_for("unet_mim_lr0.3", "realistic", 1008, seed=3, pretrained=model)
    assert slow["pretrained_ckpt"] == str(model) and slow["encoder_lr_scale"] == 0.3 and slow["seed"] == 3
    assert "data_preset" not in slow and slow["num_classes"] == 6  # the preset comes from the pretrained file
    assert lc.ARMS["unet_mim"][2] == lc.ARMS["unet_mim_lr0.3"][2] == "demo" and lc.ARMS["unet"][2] is None
    assert lc.run_folder(tmp_path, "unet", 0) == tmp_path / "curve_unet"
    assert lc.run_folder(tmp_path, "unet", 2) == tmp_path / "curve_unet_s2"
    assert lc.run_key({"setting": "realistic", "arm": "unet"}) == ("realistic", 0, "unet")  # rows without a seed


def test_a_pretraining_runs_once_and_is_reused(tmp_path, monkeypatch):
    import learning_curves as lc

    calls = []

    def fake_bundle(name, configs, overrides, args, log, minutes=None):
        calls.append((name, configs, overrides))
        out = Path(args[args.index("--output_dir") + 1])
        (out / "models").mkdir(parents=True, exist_ok=True)
        (out / "models" / "model.pt").write_bytes(b"weights")
        (out / "reconstruction_error.json").write_text('{"masked_mse_ratio": 0.36}')
        return ""

    monkeypatch.setattr(lc.de, "bundle", fake_bundle)
    first = lc.pretrain("long", "realistic", tmp_path / "data", tmp_path / "curve_pre_long")
    assert first["masked_mse_ratio"] == 0.36 and first["pretrain_minutes"] is not None
    assert first["pretrained_ckpt"] == str(tmp_path / "curve_pre_long" / "models" / "model.pt")
    (name, configs, overrides), infer = calls[0], calls[1]
    assert name == "mae_pretrain" and configs == ["train.json", "mim_cnn.json", "configs/demo_pretrain_cpu.json"]
    assert overrides["max_epochs"] == 120 and "pixdim=[3.5, 3.5, 3.5]" in overrides["data_preset"]
    assert infer[1] == ["inference.json"]
    again = lc.pretrain("long", "realistic", tmp_path / "data", tmp_path / "curve_pre_long")
    assert len(calls) == 2 and again["pretrain_minutes"] is None and again["masked_mse_ratio"] == 0.36


def test_learning_curve_report_pairs_each_validation_with_the_loss_before_it():
    import learning_curves as lc

    validations, train = de.curves(LOG, steps_per_epoch=6)
    row = {"setting": "realistic", "arm": "unetr", "architecture": "unetr", "planned_steps": 1008, "stopped": True,
           "minutes": 30.04, "best_dice": 0.5, "validations": validations, "train_loss": train, "lr": 1e-3,
           "warmup_epochs": 2}  # fmt: skip
    assert lc.loss_at(train, 6) == 2.25 and lc.loss_at(train, 11) == 2.25 and lc.loss_at(train, 5) is None
    text = lc.report([row], "python benchmarks/learning_curves.py")
    assert (
        "| realistic | unetr | 0 | none | 0.001 (2) | 6: 0.250 / 2.250, 12: 0.500 / 1.750 (stopped at step 12 of 1008) "
        "| 0.500 | 30.0 |" in text
    )
    pretrained = dict(row, arm="unet_mim_lr0.3", seed=1, pretraining="demo", masked_mse_ratio=0.3612,
                      encoder_lr_scale=0.3, stopped=False)  # fmt: skip
    assert "| realistic | unet_mim_lr0.3 | 1 | demo (0.361) | 0.001, x0.3 pretrained (2) | 6: 0.250 / 2.250, 12: " in (
        lc.report([pretrained], "x")
    )


def test_learning_curve_plot_writes_a_png_of_every_arm(tmp_path):
    import learning_curves as lc

    validations, train = de.curves(LOG, steps_per_epoch=6)
    rows = [{"arm": arm, "stopped": arm == "unetr", "validations": validations, "train_loss": train}
            for arm in ("unet", "unetr")]  # fmt: skip
    out = tmp_path / "out.json"
    out.write_text(de.json.dumps({"command": "x", "runs": rows}))
    assert lc.main(["--out", str(out), "--plot", str(tmp_path / "figures" / "curves.png")]) == 0
    assert (tmp_path / "figures" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stopped_arm_is_scored_from_its_newest_checkpoint(tmp_path):
    import learning_curves as lc
    import torch
    from monai.bundle import ConfigParser

    data = tmp_path / "data"
    de.write_synthetic_dataset(data, num=2, num_validation=1, shape=(32, 32, 24), num_organs=2)
    out = tmp_path / "curve_unet"
    assert lc.last_checkpoint(out) is None and lc.score_checkpoint("unet", "phantoms", data, out, 12) is None
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / "mae_finetune" / "configs" / "train.json"),
                        str(REPO / "configs" / "demo_finetune_cpu.json")])  # fmt: skip
    parser.update({"bundle_root": str(REPO / "bundles" / "mae_finetune"), "dataset_dir": str(data),
                   "output_dir": str(tmp_path / "unused"), "architecture": "unet"})  # fmt: skip
    (out / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    weights = parser.get_parsed_content("network_def").state_dict()
    torch.save(
        {"network": {k: torch.zeros_like(v) for k, v in weights.items()}}, out / "checkpoints" / "checkpoint_epoch=1.pt"
    )
    torch.save({"network": weights}, out / "checkpoints" / "checkpoint_epoch=2.pt")
    assert lc.last_checkpoint(out) == (out / "checkpoints" / "checkpoint_epoch=2.pt", 2)
    scored = lc.score_checkpoint("unet", "phantoms", data, out, 12)
    assert scored["step"] == 12 and scored["checkpoint"] is True
    assert set(scored) >= {"val_mean_dice", "val_dice_organ_1", "val_dice_organ_2"}  # named as the datalist names them
    assert 0.0 <= scored["val_mean_dice"] <= 1.0


def test_a_checkpoint_score_is_added_only_after_the_last_validation():
    import learning_curves as lc

    validations = [{"step": 252, "val_mean_dice": 0.5}]
    assert lc.add_if_later(validations, None) is False
    assert lc.add_if_later(validations, {"step": 252, "checkpoint": True, "val_mean_dice": 0.6}) is False
    assert lc.add_if_later(validations, {"step": 330, "checkpoint": True, "val_mean_dice": 0.6}) is True
    assert [v["step"] for v in validations] == [252, 330]
    empty: list = []
    assert lc.add_if_later(empty, {"step": 246, "checkpoint": True, "val_mean_dice": 0.59}) and len(empty) == 1
