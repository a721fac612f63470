"""``benchmarks/bench_vs_monai.py --decoders``: MAEViT's decoder variants timed side by side, on the quick config.

The MONAI comparison itself is a benchmark (``benchmarks/README.md``); this checks the decoder table end to end,
where ``--json`` without a file writes, and the helpers the benchmarks share (``bench_common``).
"""

from __future__ import annotations

import json
import math
import sys

import pytest
from bundle_utils import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_vs_monai  # noqa: E402


def test_decoder_variants_table_and_json(tmp_path, capsys):
    out = tmp_path / "decoders.json"
    bench_vs_monai.main(
        ["--quick", "--configs", "c", "--decoders", "--steps", "2", "--warmup", "0", "--json", str(out)]
    )
    printed = capsys.readouterr().out
    config = bench_vs_monai.CONFIGS["c-quick"]
    n_masked = config.num_tokens - config.num_visible
    assert f"({config.num_tokens} tokens, {n_masked} masked)" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "x |" in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(bench_vs_monai.DECODER_VARIANTS)
    assert rows[0].endswith("| 1.00 | 1.00x |")  # the self-attention decoder is the reference
    summary = json.loads(out.read_text())["decoders"][config.name]
    assert list(summary) == list(bench_vs_monai.DECODER_VARIANTS)
    for label, variant in summary.items():
        assert len(variant["step_times_s"]) == 2 and variant["step_median_s"] > 0
    # same weights apart from the decoder blocks' layout: the cross blocks add one LayerNorm (norm_kv) each
    params = {label: variant["params"] for label, variant in summary.items()}
    assert params["cross, predict 1.0"] == params["cross, predict 0.25"] > params["self-attention"]
    with pytest.raises(SystemExit):
        bench_vs_monai.main(["--configs", "z", "--decoders"])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--json"], REPO / "benchmarks" / "results" / "bench_vs_monai.json"),
        (["--json", "--decoders"], REPO / "benchmarks" / "results" / "bench_vs_monai_decoders.json"),
        (["--json", "elsewhere.json"], "elsewhere.json"),
        ([], None),
    ],
)
def test_json_without_a_file_goes_under_benchmarks_results(argv, expected):
    assert bench_vs_monai.parse_args(argv).json == (None if expected is None else str(expected))


def test_shared_memory_and_timing_helpers():
    import bench_common

    assert bench_common.RESULTS == REPO / "benchmarks" / "results"
    assert bench_common.FIGURES == REPO / "benchmarks" / "figures"
    calls = []
    times = bench_common.time_calls(lambda: calls.append(len(calls)), 3)
    assert calls == [0, 1, 2] and len(times) == 3 and all(t >= 0 for t in times)
    ballast = bytearray(64 * 1024 * 1024)  # touched pages: the peak RSS covers them
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    rss = bench_common.proc_status_mib("VmRSS")
    if not math.isnan(rss):  # a /proc/self/status to read (Linux)
        assert bench_common.peak_rss_mib() >= rss >= 64
    assert len(bench_common.load_average()) == 3
    assert math.isnan(bench_common.proc_status_mib("NoSuchField"))
    del ballast
