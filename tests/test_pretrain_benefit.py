"""The bookkeeping of ``benchmarks/pretrain_benefit.py``: settings, resuming, summary, table and chart.

(The training itself is the bundle's and the package's code, tested elsewhere; a full run is a benchmark.)
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys

import nibabel as nib
import numpy as np
import pytest
from bundle_utils import REPO
from PIL import Image

sys.path.insert(0, str(REPO / "benchmarks"))
import pretrain_benefit as pb  # noqa: E402

DICE = {  # (arm, n, seed) -> Dice
    ("scratch", 2, 0): 0.10, ("pretrained", 2, 0): 0.30,
    ("scratch", 2, 1): 0.20, ("pretrained", 2, 1): 0.25,
    ("scratch", 2, 2): 0.30, ("pretrained", 2, 2): 0.20,
    ("scratch", 4, 0): 0.40, ("pretrained", 4, 0): 0.50,
    ("scratch", 4, 1): 0.45,  # no pretrained run for seed 1: not paired, left out
}  # fmt: skip


def _runs() -> list[dict]:
    return [
        {"arm": arm, "n_labeled": n, "seed": seed, "dice": dice,
         "per_class": {"organ_1": dice, "organ_2": 2 * dice}}
        for (arm, n, seed), dice in DICE.items()
    ]  # fmt: skip


def test_summary_pairs_seeds_and_reports_mean_std_and_differences():
    cfg = dataclasses.replace(pb.PRESETS["cpu"], labeled_sizes=(2, 4, 8))
    rows = pb.summarise(_runs(), cfg)
    assert [row["n_labeled"] for row in rows] == [2, 4]  # nothing ran for 8
    two, four = rows
    assert two["seeds"] == [0, 1, 2] and four["seeds"] == [0]
    assert two["scratch"]["mean"] == pytest.approx(0.2)
    assert two["scratch"]["std"] == pytest.approx(statistics.stdev([0.1, 0.2, 0.3]))
    assert two["pretrained"]["mean"] == pytest.approx(0.25)
    assert two["difference"]["mean"] == pytest.approx(0.05)
    assert two["difference"]["std"] == pytest.approx(statistics.stdev([0.2, 0.05, -0.1]))
    assert two["pretrained_better"] == 2
    assert four["scratch"] == {"mean": pytest.approx(0.4), "std": 0.0}
    assert four["per_class_mean"]["pretrained"] == {"organ_1": pytest.approx(0.5), "organ_2": pytest.approx(1.0)}

    env = {"command": "python benchmarks/pretrain_benefit.py", "device": "cpu", "torch": "2", "monai": "1",
           "threads": 2, "total_minutes": 61.0}  # fmt: skip
    pretrain = {"steps": 1200, "seconds": 1572.0, "first_epoch_loss": 0.2, "last_epoch_loss": 0.01, "reused": True}
    text = pb.format_markdown(rows, cfg, env, pretrain)
    assert "| 2 | 0.200 +- 0.100 | 0.250 +- 0.050 | +0.050 +- 0.150 | 2/3 |" in text
    assert "| 4 | 0.400 +- 0.000 | 0.500 +- 0.000 | +0.100 +- 0.000 | 1/1 |" in text
    assert "(reused from an earlier run)" in text and "61 min in all" in text


def test_chart_is_a_png_with_every_architecture_and_arm(tmp_path):
    rows = pb.summarise(_runs(), pb.PRESETS["cpu"])
    path = pb.draw_chart({"UNETR": rows, "ViTSeg": rows}, tmp_path / "chart" / "benefit.png", "title")
    image = Image.open(path).convert("RGB")
    assert image.size == (900, 560)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20)}
    expected = {tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in pb.ARM_STYLE.values()}
    assert expected <= colours  # scratch and pretrained lines of both architectures


def test_chart_of_one_labeled_size_keeps_both_arms_near_the_middle(tmp_path):
    rows = [row for row in pb.summarise(_runs(), pb.PRESETS["cpu"]) if row["n_labeled"] == 2]
    image = Image.open(pb.draw_chart({"UNet": rows}, tmp_path / "one.png", "title")).convert("RGB")
    pixels = image.load()
    for arm in pb.ARMS:
        colour = pb.ARM_STYLE[(arm, 0)]
        rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
        columns = [x for x in range(image.width) for y in range(image.height) if pixels[x, y] == rgb]
        # the error bar and markers dominate (the legend's short line sample does not move the median)
        assert 0.4 * image.width < statistics.median(columns) < 0.6 * image.width, (arm, statistics.median(columns))


def test_a_long_chart_title_is_wrapped_inside_the_figure(tmp_path):
    rows = [row for row in pb.summarise(_runs(), pb.PRESETS["cpu"]) if row["n_labeled"] == 2]
    title = (
        "UNet (unlabeled and test: contrast 0.7, noise 35 HU, bias 20 HU) Dice on held-out realistic phantoms (5 seeds)"
    )
    image = Image.open(pb.draw_chart({"UNet": rows}, tmp_path / "long.png", title)).convert("L")
    pixels = image.load()
    edges = [pixels[x, y] for x in (0, 1, image.width - 2, image.width - 1) for y in range(image.height)]
    assert min(edges) > 200  # no text runs off either side


def test_chart_titles_name_the_phantoms_the_dice_was_measured_on():
    realistic = pb.preset_config("cpu", "unet", "realistic")
    assert pb.phantoms_label(realistic) == "realistic phantoms"
    assert pb.phantoms_label(dataclasses.asdict(realistic)) == "realistic phantoms"  # a report's "config"
    assert pb.phantoms_label(pb.preset_config("cpu", "unet")) == "phantoms"
    assert pb.phantoms_label({"architecture": "unetr"}) == "phantoms"  # reports written before the setting existed


def test_combined_table_reads_the_reports_of_both_architectures(tmp_path):
    cfg = pb.PRESETS["cpu"]
    runs = [{**run, "steps": 300, "seconds": 200.0} for run in _runs()]
    reports = []
    for arch in ("unetr", "vitseg"):
        path = tmp_path / f"{arch}.json"
        path.write_text(
            json.dumps({"config": {"architecture": arch}, "summary": pb.summarise(runs, cfg), "runs": runs})
        )
        reports.append(path)
    markdown = pb.combine(reports, tmp_path / "out").read_text()
    assert (
        "| labeled volumes | UNETR scratch | UNETR pretrained |" in markdown
        and "ViTSeg difference (better)" in markdown
    )
    assert "| 2 | 0.200 +- 0.100 | 0.250 +- 0.050 | +0.050 (2/3) | 0.200 +- 0.100 |" in markdown
    assert "UNETR: 300 steps per fine-tune, 200 s on average (200-200 s)" in markdown
    assert (tmp_path / "out" / "pretrain_benefit_combined.png").is_file()


def test_finished_runs_are_read_back_and_a_torn_line_is_skipped(tmp_path):
    path = tmp_path / "runs.jsonl"
    assert pb._load_done(path) == {}
    lines = [json.dumps(run) for run in _runs()[:3]]
    path.write_text("\n".join(lines) + '\n{"arm": "scratch", "n_lab', encoding="utf-8")
    done = pb._load_done(path)
    assert sorted(done) == [("pretrained", 2, 0), ("scratch", 2, 0), ("scratch", 2, 1)]
    assert done[("pretrained", 2, 0)]["dice"] == 0.30


def test_flags_override_the_preset_and_bad_settings_are_named():
    cfg = pb.build_config(pb.parse_args(["--finetune-steps", "20", "--labeled-sizes", "2", "8", "--seeds", "4"]))
    assert (cfg.finetune_steps, cfg.labeled_sizes, cfg.seeds) == (20, (2, 8), (4,))
    assert cfg.roi == pb.PRESETS["cpu"].roi
    assert pb.build_config(pb.parse_args(["--quick"])) == pb.PRESETS["quick"]
    with pytest.raises(ValueError, match="roi must be a multiple of the patch size 16, got 40"):
        pb.build_config(pb.parse_args(["--roi", "40"]))
    # --architecture vitseg: the preset's long-sequence changes, then the flags
    vitseg = pb.build_config(pb.parse_args(["--architecture", "vitseg", "--finetune-steps", "50"]))
    assert (vitseg.architecture, vitseg.patch, vitseg.num_layers, vitseg.mae_cls_token) == ("vitseg", 8, 6, False)
    assert (vitseg.finetune_steps, vitseg.encoder_lr_scale, vitseg.roi) == (50, 0.3, pb.PRESETS["cpu"].roi)
    assert (vitseg.norm_pix_loss, vitseg.pretrain_lr, vitseg.residual_scale) == (False, 5e-4, 1.0)
    assert vitseg.pretrain_key() != pb.PRESETS["cpu"].pretrain_key()
    with pytest.raises(ValueError, match="UNETR fixes patch 16 and 12 layers, got patch 8, 12 layers"):
        pb.build_config(pb.parse_args(["--patch", "8"]))
    with pytest.raises(ValueError, match="architecture must be one of"):
        dataclasses.replace(pb.PRESETS["cpu"], architecture="swin").check()
    with pytest.raises(ValueError, match=r"labeled_sizes \(2, 16\) ask for more volumes than num_labeled_pool=8"):
        pb.build_config(pb.parse_args(["--labeled-sizes", "2", "16"]))
    with pytest.raises(ValueError, match="hidden_size=100 must be divisible by num_heads=3"):
        pb.build_config(pb.parse_args(["--hidden-size", "100", "--num-heads", "3"]))
    with pytest.raises(ValueError, match="num_organs must be in 1..5, got 6"):
        pb.build_config(pb.parse_args(["--num-organs", "6"]))
    with pytest.raises(ValueError, match="layout must be one of .*, got 'atlas'"):
        dataclasses.replace(pb.PRESETS["cpu"], layout="atlas").check()
    random_layout = pb.build_config(pb.parse_args(["--layout", "random", "--num-organs", "4"]))
    assert (random_layout.layout, random_layout.num_organs) == ("random", 4)
    assert random_layout.pretrain_key() != pb.PRESETS["cpu"].pretrain_key()  # another MAE for other phantoms
    # the fine-tune cache key changes with any setting but not with the grid
    base = pb.PRESETS["cpu"]
    key = pb._runs_key(base, pb.torch.device("cpu"), False)
    assert key == pb._runs_key(dataclasses.replace(base, seeds=(7,)), pb.torch.device("cpu"), False)
    assert key != pb._runs_key(dataclasses.replace(base, finetune_lr=1e-4), pb.torch.device("cpu"), False)
    # the scratch arm's key ignores how the MAE is trained and transferred, but not the fine-tuning itself
    scratch = pb._runs_key(base, pb.torch.device("cpu"), False, "scratch")
    assert scratch != key
    for change in (dict(layer_decay=0.75), dict(residual_scale=1.0), dict(pretrain_epochs=3), dict(masking_ratio=0.5)):
        assert pb._runs_key(dataclasses.replace(base, **change), pb.torch.device("cpu"), False, "scratch") == scratch
        assert pb._runs_key(dataclasses.replace(base, **change), pb.torch.device("cpu"), False) != key
    assert (
        pb._runs_key(dataclasses.replace(base, finetune_steps=10), pb.torch.device("cpu"), False, "scratch") != scratch
    )
    # --residual-scale: 'auto' or a positive factor
    assert pb.build_config(pb.parse_args(["--residual-scale", "0.05"])).residual_scale == 0.05
    assert pb.build_config(pb.parse_args(["--residual-scale", "AUTO"])).residual_scale == "auto"
    for bad in ("0", "-1", "nan", "half"):
        with pytest.raises(SystemExit):
            pb.parse_args(["--residual-scale", bad])
    with pytest.raises(ValueError, match="residual_scale must be 'auto' or a positive number, got 'half'"):
        dataclasses.replace(base, residual_scale="half").check()
    # --drop-path-rate: ViTSeg's stochastic depth for the pretrained arm; off keeps the keys of older runs
    dropped = pb.build_config(
        pb.parse_args(["--architecture", "vitseg", "--finetune-steps", "50", "--drop-path-rate", "0.1"])
    )
    assert dropped.drop_path_rate == 0.1
    cpu = pb.torch.device("cpu")
    assert pb._runs_key(dropped, cpu, False) != pb._runs_key(vitseg, cpu, False)
    assert pb._runs_key(dropped, cpu, False, "scratch") == pb._runs_key(vitseg, cpu, False, "scratch")
    blocks = pb.build_network(dropped, drop_path_rate=0.1).blocks  # linear from 0 over the blocks
    assert isinstance(blocks[0].drop_path, pb.torch.nn.Identity) and blocks[-1].drop_path.drop_prob == pytest.approx(
        0.1
    )
    with pytest.raises(
        ValueError, match="drop_path_rate must be in \\[0, 1\\) and needs architecture 'vitseg', got 0.1"
    ):
        dataclasses.replace(base, drop_path_rate=0.1).check()


def test_visible_loss_weight_and_intensity_jitter_settings():
    cpu = pb.torch.device("cpu")
    vitseg = pb.build_config(pb.parse_args(["--architecture", "vitseg"]))
    assert (vitseg.visible_loss_weight, vitseg.intensity_shift, vitseg.intensity_scale) == (1.0, 0.1, 0.1)
    # off (UNETR's preset) keeps the keys of the MAEs and fine-tunes made before the settings existed
    plain = dataclasses.replace(vitseg, visible_loss_weight=0.0, intensity_shift=0.0, intensity_scale=0.0)
    without = {
        k: v
        for k, v in dataclasses.asdict(plain).items()
        if k not in ("visible_loss_weight", "intensity_shift", "intensity_scale")
    }
    names = ("phantom_shape", "phantom_spacing", "layout", "num_organs", "roi", "hidden_size", "mlp_dim", "num_heads", "patch", "num_layers",
             *[n for n in pb._MAE_ONLY if n not in ("visible_loss_weight", "mask_fill", "mask_patch", "pretrain_on_target")])  # fmt: skip
    old_key = pb.hashlib.sha1(pb.json.dumps({n: without[n] for n in names}, sort_keys=True).encode()).hexdigest()[:10]
    assert plain.pretrain_key() == old_key != vitseg.pretrain_key()
    # the visible-patch weight is an MAE setting (scratch keeps its runs); the jitter is both arms'
    scratch = pb._runs_key(plain, cpu, False, "scratch")
    assert pb._runs_key(dataclasses.replace(plain, visible_loss_weight=1.0), cpu, False, "scratch") == scratch
    assert pb._runs_key(dataclasses.replace(plain, intensity_shift=0.1), cpu, False, "scratch") != scratch
    flags = pb.build_config(
        pb.parse_args(["--architecture", "vitseg", "--visible-loss-weight", "0.5", "--intensity-shift", "0.2"])
    )
    assert (flags.visible_loss_weight, flags.intensity_shift, flags.intensity_scale) == (0.5, 0.2, 0.1)
    for bad, match in ((dict(visible_loss_weight=-1.0), "visible_loss_weight must be >= 0, got -1.0"),
                       (dict(intensity_scale=1.0), r"intensity_shift must be >= 0 and intensity_scale in \[0, 1\), got 0.1, 1.0")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(vitseg, **bad).check()
    # the jitter is in the fine-tuning chain only, after the crops: image scaled then shifted, label untouched
    tail = [type(t).__name__ for t in pb._train_transforms(vitseg, 2, with_label=True).transforms[-5:]]
    assert tail == ["RandFlipd", "RandScaleIntensityd", "RandShiftIntensityd", "EnsureTyped", "EnsureTyped"]
    for chain in (pb._train_transforms(vitseg, 2, with_label=False), pb._train_transforms(plain, 2, with_label=True)):
        names = [type(t).__name__ for t in chain.transforms]  # MAE pretraining, or jitter off: no intensity jitter
        assert (
            names[-3:] == ["RandFlipd", "EnsureTyped", "EnsureTyped"]
            and "RandScaleIntensityd" not in names
            and "RandShiftIntensityd" not in names
        )


@pytest.mark.slow  # times a training step of six full-size networks
def test_step_times_of_every_architecture_at_the_preset_sizes():
    times = pb.step_times("quick", steps=1, device=pb.torch.device("cpu"))
    names = {"unetr", "vitseg", "vitseg_conv_skips", "unet", "dynunet", "segresnet"}
    assert set(times) == names and all(t > 0 for t in times.values())
    counts = pb.parameter_counts("quick")
    hybrid = pb.build_network(pb.step_time_configs("quick")["vitseg_conv_skips"])
    skips = sum(p.numel() for n, p in hybrid.named_parameters() if n.startswith(("skip_stem.", "skip_fuse.")))
    assert set(counts) == names and skips > 0 and counts["vitseg_conv_skips"] == counts["vitseg"] + skips


def test_conv_skips_setting_builds_the_hybrid_under_its_own_cache_key_and_report_name(tmp_path):
    cpu = pb.torch.device("cpu")
    plain = pb.build_config(pb.parse_args(["--architecture", "vitseg"]))
    hybrid = pb.build_config(pb.parse_args(["--architecture", "vitseg", "--conv-skips"]))
    assert (plain.conv_skips, hybrid.conv_skips) == (False, True)
    # off: the keys of the fine-tunes cached before the setting existed (the committed UNet runs among them)
    for cfg in (plain, pb.preset_config("cpu", "unet")):
        for arm in pb.ARMS:
            drop = ("labeled_sizes", "seeds", "conv_skips", *(pb._PRETRAINED_ONLY if arm == "scratch" else ()))
            settings = pb._without_unset_later_settings(
                {k: v for k, v in dataclasses.asdict(cfg).items() if k not in drop}
            )
            text = json.dumps({**settings, "device": "cpu", "amp": False, "arm": arm}, sort_keys=True)
            assert pb._runs_key(cfg, cpu, False, arm) == pb.hashlib.sha1(text.encode()).hexdigest()[:10]
    work = REPO / "benchmarks" / "results" / "pretrain_benefit_work"
    unet = pb.preset_config("cpu", "unet")
    assert all((work / f"runs_{pb._runs_key(unet, cpu, False, arm)}.jsonl").is_file() for arm in pb.ARMS)
    # on: both arms are other networks (new keys), the MAE is the same
    for arm in pb.ARMS:
        assert pb._runs_key(hybrid, cpu, False, arm) != pb._runs_key(plain, cpu, False, arm)
    assert hybrid.pretrain_key() == plain.pretrain_key()
    assert pb.report_name(plain) == "pretrain_benefit_vitseg"
    assert pb.report_name(hybrid) == "pretrain_benefit_vitseg_conv_skips"
    assert pb.report_name(dataclasses.replace(hybrid, style="realistic"), quick=True) == (
        "pretrain_benefit_quick_vitseg_conv_skips_realistic"
    )
    quick = pb.build_config(pb.parse_args(["--quick", "--architecture", "vitseg", "--conv-skips"]))
    network = pb.build_network(quick)
    assert isinstance(network, pb.ViTSeg) and network.conv_skips
    assert not pb.build_network(dataclasses.replace(quick, conv_skips=False)).conv_skips
    with pytest.raises(ValueError, match="conv_skips needs architecture 'vitseg', got 'unetr'"):
        pb.build_config(pb.parse_args(["--conv-skips"]))
    # reports: the settings name it, and a combined table keeps it apart from the plain ViTSeg
    rows = pb.summarise(_runs(), hybrid)
    pretrain = {"steps": 1, "seconds": 60.0, "first_epoch_loss": 1.0, "last_epoch_loss": 0.5}
    markdown = pb.format_markdown(
        rows,
        hybrid,
        {"command": "c", "device": "cpu", "torch": "t", "monai": "m", "threads": 1, "total_minutes": 1.0},
        pretrain,
    )
    assert markdown.startswith("## MAE pretraining benefit for ViTSeg+skips (")
    assert "ViTSeg with convolutional skips (conv_skips" in markdown
    paths = []
    for cfg in (plain, hybrid):
        path = tmp_path / f"{pb.report_name(cfg)}.json"
        runs = [{**run, "steps": 800, "seconds": 100.0} for run in _runs()]
        path.write_text(json.dumps({"config": dataclasses.asdict(cfg), "summary": rows, "runs": runs}))
        paths.append(path)
    combined = pb.combine(paths, tmp_path / "out").read_text()
    assert "| labeled volumes | ViTSeg scratch |" in combined and "| ViTSeg+skips scratch |" in combined


def _report(arm_dice: dict[str, list[float]], n: int = 2) -> dict:
    return {"runs": [{"arm": arm, "n_labeled": n, "seed": seed, "dice": d}
                     for arm, values in arm_dice.items() for seed, d in enumerate(values)]}  # fmt: skip


def test_best_arms_compare_the_best_of_any_architecture_seed_by_seed():
    reports = {
        "UNet": _report({"scratch": [0.80, 0.82, 0.84, 0.86, 0.88], "pretrained": [0.83, 0.85, 0.86, 0.85, 0.91]}),
        "ViTSeg": _report({"scratch": [0.40, 0.45, 0.50, 0.55, 0.60], "pretrained": [0.90, 0.90, 0.90, 0.90, 0.95]}),
    }
    (row,) = pb.best_arms(reports)
    assert row["scratch"]["architecture"] == "UNet" and row["pretrained"]["architecture"] == "ViTSeg"
    assert row["difference"] == pytest.approx(0.07) and row["better"] == 5 and row["target_met"]
    text = pb.format_best_arms([row])
    assert "| 2 | UNet 0.840 (5 seeds) | ViTSeg 0.910 (5 seeds) | +0.070 | 5/5 | met |" in text
    # better on average but only in 3 of 5 seeds: missed
    reports["ViTSeg"] = _report({"scratch": [0.4] * 5, "pretrained": [0.98, 0.98, 0.98, 0.75, 0.75]})
    (row,) = pb.best_arms(reports)
    assert row["pretrained"]["architecture"] == "ViTSeg" and row["better"] == 3 and not row["target_met"]
    # an architecture without a run at this size: no verdict
    reports["UNETR"] = _report({"scratch": [0.5] * 5, "pretrained": [0.5] * 5}, n=4)
    rows = {r["n_labeled"]: r for r in pb.best_arms(reports)}
    assert rows[2]["unmeasured"] == ["UNETR"] and not rows[2]["target_met"]
    assert "no verdict: UNETR not measured" in pb.format_best_arms([rows[2]])


def test_the_report_command_names_no_temporary_path(tmp_path):
    command = pb.portable_command(["--out-dir", str(tmp_path / "out"), "--work-dir", str(pb.REPO / "benchmarks")])
    assert command == "python benchmarks/pretrain_benefit.py --out-dir '<tmp>/out' --work-dir benchmarks"


def test_learning_curve_setting_leaves_earlier_cache_keys_alone():
    cfg = pb.preset_config("cpu", "vitseg")
    curved = pb.dataclasses.replace(cfg, curve_steps=(250, 500))
    cpu = pb.torch.device("cpu")
    assert pb._runs_key(cfg, cpu, False) != pb._runs_key(curved, cpu, False)
    assert cfg.pretrain_key() == curved.pretrain_key() == "6538cdd3e3"  # the MAE of the committed ViTSeg report
    args = pb.parse_args(["--architecture", "unet", "--curve-steps", "250", "500", "1000"])
    assert pb.build_config(args).curve_steps == (250, 500, 1000)


def test_masked_image_model_variants_get_their_own_pretraining_and_report_and_reuse_the_scratch_runs():
    cfg = pb.preset_config("cpu", "unet", "realistic")
    learned = pb.build_config(
        pb.parse_args(["--architecture", "unet", "--setting", "realistic", "--mask-fill", "learned"])
    )
    cpu = pb.torch.device("cpu")
    assert learned.mask_fill == "learned" and cfg.mask_fill == "zero"
    # the committed realistic UNet report's masked-image model and runs keep their keys
    assert cfg.pretrain_key() == "3b058e5e3a"
    assert (pb._runs_key(cfg, cpu, False, "scratch"), pb._runs_key(cfg, cpu, False)) == ("a9f1ce64fb", "f54e0acf76")
    assert learned.pretrain_key() != cfg.pretrain_key()
    assert pb._runs_key(learned, cpu, False) != pb._runs_key(cfg, cpu, False)
    assert pb._runs_key(learned, cpu, False, "scratch") == pb._runs_key(cfg, cpu, False, "scratch")
    assert pb.report_name(learned) == "pretrain_benefit_unet_learned_fill_realistic"
    assert pb.report_name(cfg) == "pretrain_benefit_unet_realistic"
    model = pb.build_pretrain_network(learned)
    assert model.mask_token is not None and tuple(model.mask_token.shape) == (1, 1, 1, 1, 1)
    assert pb.build_pretrain_network(cfg).mask_token is None
    mean = pb.dataclasses.replace(cfg, mask_fill="mean")
    assert len({mean.pretrain_key(), learned.pretrain_key(), cfg.pretrain_key()}) == 3
    assert pb._runs_key(mean, cpu, False, "scratch") == pb._runs_key(cfg, cpu, False, "scratch")
    assert pb.report_name(mean) == "pretrain_benefit_unet_mean_fill_realistic"
    assert pb.build_pretrain_network(mean).mask_fill == "mean"
    # masks of 16^3 cubes: a new masked-image model, the same scratch runs, the MAE's loss on the same cubes
    cubes = pb.build_config(pb.parse_args(["--architecture", "unet", "--setting", "realistic", "--mask-patch", "16"]))
    assert (cubes.mask_patch, cubes.masking_patch, cfg.masking_patch) == (16, 16, 8)
    assert cubes.pretrain_key() not in (cfg.pretrain_key(), mean.pretrain_key())
    assert pb._runs_key(cubes, cpu, False, "scratch") == pb._runs_key(cfg, cpu, False, "scratch")
    assert pb._runs_key(cubes, cpu, False) != pb._runs_key(cfg, cpu, False)
    assert pb.report_name(cubes) == "pretrain_benefit_unet_mask16_realistic"
    assert pb.build_pretrain_network(cubes).patch_size == (16, 16, 16)
    fewer = pb.build_config(pb.parse_args(["--architecture", "unet", "--num-unlabeled", "8", "--pretrain-epochs", "360",
                                           "--pretrain-warmup-epochs", "36"]))  # fmt: skip
    assert (fewer.num_unlabeled, fewer.pretrain_epochs, fewer.pretrain_warmup_epochs) == (8, 360, 36)
    assert fewer.pretrain_key() != pb.preset_config("cpu", "unet").pretrain_key()
    for bad in ({"mask_patch": 20}, {"mask_patch": 16, "architecture": "vitseg"}):
        with pytest.raises(ValueError, match="mask_patch needs a CNN architecture"):
            pb.dataclasses.replace(cfg, **bad).check()
    with pytest.raises(ValueError, match="mask_fill 'learned' needs a CNN"):
        pb.dataclasses.replace(pb.preset_config("cpu", "vitseg"), mask_fill="learned").check()
    with pytest.raises(ValueError, match="mask_fill must be one of"):
        pb.dataclasses.replace(cfg, mask_fill="noise").check()


def test_a_target_scanner_draws_the_unlabeled_and_test_phantoms_with_its_knobs(tmp_path):
    cfg = pb.build_config(pb.parse_args(["--quick", "--architecture", "unet", "--setting", "realistic"]))
    shifted = pb.build_config(pb.parse_args(["--quick", "--architecture", "unet", "--setting", "realistic",
                                             "--target-scanner", "0.7", "35", "20"]))  # fmt: skip
    assert shifted.target_scanner == (0.7, 35.0, 20.0) and cfg.target_scanner == ()
    cpu = pb.torch.device("cpu")
    # another pool and test set: a new pretraining and new runs of both arms; without it the keys are as before
    assert shifted.pretrain_key() != cfg.pretrain_key()
    assert pb._runs_key(shifted, cpu, False, "scratch") != pb._runs_key(cfg, cpu, False, "scratch")
    assert "target_scanner" not in pb._without_unset_later_settings(pb.asdict(cfg))
    assert pb.report_name(shifted) == "pretrain_benefit_unet_realistic_scanner0.7-35-20"
    unlabeled, pool, test = pb.prepare_data(shifted, tmp_path)
    _, same_pool, plain_test = pb.prepare_data(cfg, tmp_path)
    assert [e["image"] for e in pool] == [e["image"] for e in same_pool]  # the labeled pool is the default scanner's
    assert "noise_hu35" in unlabeled[0]["image"] and "noise_hu35" in test[0]["image"]
    assert "noise_hu35" not in pool[0]["image"] and "noise_hu35" not in plain_test[0]["image"]
    image, label = (nib.load(test[0][k]) for k in ("image", "label"))
    plain_image, plain_label = (nib.load(plain_test[0][k]) for k in ("image", "label"))
    assert np.array_equal(label.get_fdata(), plain_label.get_fdata())  # same anatomy and labels
    diff = image.get_fdata() - plain_image.get_fdata()
    assert np.abs(diff).mean() > 5.0  # another contrast, noise and bias: different intensities
    slices = pb.draw_both_scanners(shifted, tmp_path, tmp_path / "fig" / "slices.png")  # default | target scanner
    picture = np.asarray(Image.open(slices).convert("L"), dtype=np.float32)
    assert picture.shape == (440, 800)
    left, right = picture[60:420, :400], picture[60:420, 400:]
    assert left.std() > 20 and right.std() > 20 and np.abs(left - right).mean() > 2  # two images, not the same one
    # the control: pretrained on the labeled pool's scanner, i.e. the one-scanner benchmark's model and unlabeled pool
    control = pb.build_config(pb.parse_args(["--quick", "--architecture", "unet", "--setting", "realistic",
                                             "--target-scanner", "0.7", "35", "20", "--no-pretrain-on-target"]))  # fmt: skip
    assert control.pretrain_on_target is False and control.pretrain_key() == cfg.pretrain_key()
    assert pb._runs_key(control, cpu, False, "scratch") == pb._runs_key(shifted, cpu, False, "scratch")
    assert pb._runs_key(control, cpu, False) not in (pb._runs_key(shifted, cpu, False), pb._runs_key(cfg, cpu, False))
    assert pb.report_name(control) == "pretrain_benefit_unet_realistic_scanner0.7-35-20_pretrained_on_labeled_scanner"
    own_unlabeled, _, control_test = pb.prepare_data(control, tmp_path)
    assert [e["image"] for e in control_test] == [e["image"] for e in test]
    assert "noise_hu35" not in own_unlabeled[0]["image"]
    assert pb.scanner_words(control) == "test (unlabeled as labeled): contrast 0.7, noise 35 HU, bias 20 HU"
    full = pb.preset_config("cpu", "unet", "realistic")  # the committed model's key, reused by the control
    assert pb.dataclasses.replace(full, target_scanner=(0.7, 35.0, 20.0), pretrain_on_target=False).pretrain_key() == (
        "3b058e5e3a"
    )
    for bad, words in (({"style": "simple"}, "needs the realistic style"), ({"target_scanner": (1.0, 15.0)}, "3 values"),
                       ({"target_scanner": (3.0, 15.0, 8.0)}, "contrast"),
                       ({"target_scanner": (), "pretrain_on_target": False}, "needs a target_scanner")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            pb.dataclasses.replace(shifted, **bad).check()
