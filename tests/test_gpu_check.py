"""``benchmarks/gpu_check.py`` on the CPU: arguments, the message without CUDA, and the tables (``--dry-run``)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from bundle_utils import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_dry_run_on_the_cpu_lists_the_bundle_checks_and_fills_the_model_table(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--device", "cpu", "--steps", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    commands = [line for line in text.splitlines() if line.startswith("would run: ")]
    assert len(commands) == 4 and sum("torch.distributed.run" in c for c in commands) == 2
    assert all("--device cuda:0" in c and "--compile True" in c for c in commands if "torch.distributed" not in c)
    assert text.count("| not run (--dry-run) | n/a |") == 4
    rows = [line for line in text.splitlines() if line.startswith("| tiny")]
    assert [row.split("|")[3].strip() for row in rows] == ["monai_mae", "monai", "monai_mae", "monai"]
    assert all(row.endswith("| n/a | n/a | n/a |") for row in rows)  # no MFU, GPU memory or syncs on a CPU
    report = json.loads(out.read_text())
    assert report["device"] == "CPU" and [r["volumes_per_s"] > 0 for r in report["rows"]] == [True] * 4
    assert [(r["img_size"], r["patch"]) for r in report["rows"]] == [(32, 16), (32, 16), (16, 8), (16, 8)]


def test_without_cuda_it_stops_with_exit_code_2_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([])
    assert stop.value.code == 2
    assert "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [(["--device", "cpu"], "--device cpu only with --dry-run"), (["--steps", "0", "--dry-run", "--device", "cpu"],
     "--steps must be >= 1, got 0"), (["--dry-run", "--device", "tpu"], "--device must be 'cuda' or 'cpu'")],
)  # fmt: skip
def test_bad_arguments_exit_2_naming_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_table_formatting_of_gpu_figures_errors_and_failed_checks():
    rows = [gpu_check.Row("ViT-B", "monai_mae", 96, 16, 4, volumes_per_s=41.234, mfu=0.4127, peak_mem_gib=11.5,
                          syncs_per_step=0),
            gpu_check.Row("Primus-B", "monai", 160, 8, 2, error="out of memory (CUDA out of memory)")]  # fmt: skip
    assert gpu_check.rows_table(rows).splitlines()[2:] == [
        "| ViT-B | 96^3 / 16^3 | monai_mae | 4 | 41.23 | 41.3% | 11.50 | 0 |",
        "| Primus-B | 160^3 / 8^3 | monai | 2 | out of memory (CUDA out of memory) | | | |",
    ]
    checks = [
        gpu_check.Check("mae_pretrain: cuda:0, bf16, compile", [], passed=True, seconds=12.34),
        gpu_check.Check("mae_finetune: DDP on 2 GPU(s), bf16", [], passed=False, seconds=3.0, log="/tmp/x.log"),
    ]
    assert gpu_check.checks_table(checks).splitlines()[2:] == [
        "| mae_pretrain: cuda:0, bf16, compile | passed | 12.3 |",
        "| mae_finetune: DDP on 2 GPU(s), bf16 | FAILED (log: /tmp/x.log) | 3.0 |",
    ]
