"""Helpers for running the bundles in tests: tiny settings and a subprocess runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: environment for bundle subprocesses: no GPU visible, so the bundles' default device is the CPU on every
#: machine (the tests check CPU behaviour: gloo, fp32, 2 threads; on a one-GPU machine rank 1 of a 2-process
#: run would otherwise ask for cuda:1)
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}

TINY_NETWORK = {
    "network_def#hidden_size": 48,
    "network_def#mlp_dim": 96,
    "network_def#num_layers": 2,
    "network_def#num_heads": 4,
    "network_def#decoder_hidden_size": 32,
    "network_def#decoder_mlp_dim": 64,
    "network_def#decoder_num_layers": 1,
    "network_def#decoder_num_heads": 4,
}


def write_overrides(path: Path, **settings) -> Path:
    path.write_text(json.dumps(settings, indent=1))
    return path


def run_bundle(
    bundle: str, config: str | list[str], overrides: Path, *args: str, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` on ``bundles/<bundle>/configs/<config>`` (one file or several layered) plus an
    override file."""
    configs = REPO / "bundles" / bundle / "configs"
    layered = [config] if isinstance(config, str) else list(config)
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str([*(str(configs / c) for c in layered), str(overrides)]),
        "--bundle_root", str(REPO / "bundles" / bundle),
        "--meta_file", str(configs / "metadata.json"),
        "--logging_file", str(configs / "logging.conf"),
        *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **CPU_ONLY}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"bundle run failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result
