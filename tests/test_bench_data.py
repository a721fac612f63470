"""``benchmarks/bench_data.py --quick``: every data path and both training steps on tiny sizes, end to end.

The in-process run (``--isolation none``) takes a few seconds; the default run, whose loader
measurements run in forked children, is marked slow. The full-size figures are a benchmark
(``benchmarks/README.md``).
"""

from __future__ import annotations

import json
import math
import sys

import pytest
from bundle_utils import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_data  # noqa: E402

PATH_LABELS = [label for _, label in bench_data.PATHS]


def _check(summary: dict, out_dir, printed: str) -> None:
    rois = bench_data.QUICK.rois
    rows = summary["rows"]
    assert [(row["path"], row["roi"]) for row in rows] == [(p, r) for r in rois for p, _ in bench_data.PATHS]
    for row in rows:
        assert row["crops_per_s"] > 0 and row["crops"] > 0 and row["seconds"] > 0
        assert len(row["round_rates"]) == bench_data.QUICK.rounds and all(r > 0 for r in row["round_rates"])
        assert row["workers_needed"] == pytest.approx(row["gpu_crops_per_s"] / row["crops_per_s"])
        assert row["crops"] % 2 == 0  # the CT preset cuts 2 crops per volume, counted as crops
        # the table row: label, crop size, the rate as printed, ratio to (a)
        assert f"| {row['label']} | {row['roi']}^3 | {bench_data._fmt(row['crops_per_s'])} [" in printed
    for roi in rois:
        assert next(r for r in rows if r["roi"] == roi and r["path"] == "nifti")["x_vs_a"] == pytest.approx(1.0)
    first = [row["first_pass"] for row in rows if "first_pass" in row]
    # (b) filled its cache once, or once per crop size where the padding to the crop size changes what it caches
    assert len(first) == (1 if summary["persistent_shared_cache"] else len(rois))
    assert all(f["crops_per_s"] > 0 for f in first)
    for model, spec in zip(summary["models"], bench_data.QUICK.models):
        assert model["gflop_per_step"] > 0 and model["cpu_step_s"] > 0
        # H100 demand = effective FLOP rate / FLOPs per step * crops per step
        expected = 989e12 * 0.40 / (model["gflop_per_step"] * 1e9) * spec.batch
        assert model["gpu_crops_per_s"] == pytest.approx(expected)
    pre = summary["preprocessing"]
    assert pre["seconds_per_volume"] > 0 and 0 < pre["mb_per_volume"] < pre["raw_int16_mb_per_volume"]
    # (c) >= 20x (a), then the workers needed on (c) and on (d)
    assert [t["met"] for t in summary["targets"]] == [
        summary["targets"][0]["value"] >= 20, summary["targets"][1]["value"] <= 14, summary["targets"][2]["value"] <= 14
    ]  # fmt: skip
    assert printed.count("- target:") == 3 and "on (d): " in printed
    converted = [row for row in rows if "convert" in row]  # (d) times from_storage_layout of its batches
    assert [row["path"] for row in converted] == ["storage"] * len(rois)
    assert all(row["convert"]["cpu_ms_per_crop"] > 0 and row["convert"]["gpu_us_per_crop"] > 0 for row in converted)
    saved = json.loads((out_dir / "bench_data_quick.json").read_text())
    saved_rates = [row["crops_per_s"] for row in saved["summary"]["rows"]]
    assert saved_rates == pytest.approx([row["crops_per_s"] for row in rows])
    assert (out_dir / "bench_data_quick.md").read_text() in printed
    assert not (out_dir / "bench_data_quick.partial.json").exists()  # the progress file goes once the report is out


def test_quick_run_in_process(tmp_path, capsys):
    summary = bench_data.main(
        ["--quick", "--isolation", "none", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]
    )
    _check(summary, tmp_path / "out", capsys.readouterr().out)


def test_paths_selects_a_subset_and_ratios_to_a_are_na(tmp_path, capsys):
    summary = bench_data.main([
        "--quick", "--isolation", "none", "--paths", "preprocessed", "storage", "--rounds", "1", "--volumes", "1",
        "--min-seconds", "0.01",
        "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    rois = bench_data.QUICK.rois
    assert [(r["path"], r["roi"]) for r in summary["rows"]] == [
        (p, r) for r in rois for p in ("preprocessed", "storage")
    ]
    assert all(math.isnan(r["x_vs_a"]) for r in summary["rows"]) and "| n/a |" in printed
    assert [t["name"].rsplit(" ", 1)[-1] for t in summary["targets"]] == ["(c)", "(d)"]
    assert printed.count("(d) / (c) per worker") == len(rois)


@pytest.mark.slow
def test_quick_run_in_forked_workers_reports_their_peak_memory(tmp_path, capsys):
    summary = bench_data.main(["--quick", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")])
    _check(summary, tmp_path / "out", capsys.readouterr().out)
    if bench_data.reset_peak_rss():  # the kernel lets a process reset its peak RSS
        assert all(math.isfinite(row["peak_growth_mib"]) and row["peak_growth_mib"] >= 0 for row in summary["rows"])


def test_volumes_are_scanner_like_and_reused(tmp_path):
    nib = pytest.importorskip("nibabel")
    shape, spacing = (24, 24, 16), (0.8, 0.8, 1.25)
    folder, seconds = bench_data.write_ct_volumes(tmp_path, 1, shape, spacing, warmup_shape=shape)
    assert seconds > 0
    img = nib.load(folder / "imagesTr/ct_000.nii.gz")
    assert img.get_data_dtype() == "int16" and (img.dataobj.slope, img.dataobj.inter) == (1.0, -1024.0)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    hu = img.get_fdata()
    assert hu.min() >= -1024 and hu.max() <= 3071
    assert bench_data.write_ct_volumes(tmp_path, 1, shape, spacing, warmup_shape=shape)[1] == 0.0  # reused
