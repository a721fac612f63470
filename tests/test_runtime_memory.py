"""``keep_freed_memory``: large blocks freed in one step are reused in the next instead of being faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from monai_mae.engines import keep_freed_memory, runtime

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# allocate, touch and free a 64 MiB tensor 6 times; print the minor page faults of the last 5 rounds
_PROBE = """
import resource, sys, torch
from monai_mae.engines import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def round_trip():
    t = torch.empty(16 << 20)  # 64 MiB of float32
    t.fill_(1.0)
    del t
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow  # two subprocesses: the setting is process-wide and cannot be undone
@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere keep_freed_memory changes nothing")
def test_freed_blocks_are_reused_without_page_faults():
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120, check=True
        )
        faults[mode] = int(out.stdout.strip().splitlines()[-1])
    assert faults["default"] > 5 * 16_000 * 0.9  # every round faults the 16,384 pages of 4 KiB in again
    assert faults["keep"] < faults["default"] / 3  # most rounds reuse the kept block (glibc faults it in now and then)


@pytest.mark.parametrize("size", [1 << 19, 1 << 31])
def test_block_size_out_of_range_is_refused(size):
    with pytest.raises(ValueError, match=f"max_block must be between 1 MiB and 2 GiB, got {size}"):
        keep_freed_memory(size)


def test_another_c_library_is_left_alone(monkeypatch):
    """Off glibc (musl, macOS, Windows) the call changes nothing and says so; checked here by pretending."""
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    assert keep_freed_memory() is False
