"""Seconds and bytes written to record N volumes in a preprocessing manifest: the journal against a whole rewrite.

A preprocessing run records each finished volume. ``journal`` is what
:func:`~monai_mae.data.preprocess.preprocess_dataset` does: one JSON line per volume appended to
``manifest.journal`` through :class:`~monai_mae.data.preprocess.manifest.ManifestJournal`, compacted into
``manifest.json`` once at the end. ``rewrite`` is the earlier scheme, kept here for comparison: the
whole ``manifest.json`` rewritten atomically (temporary file, fsync, rename) after every volume, so the
bytes written grow with the square of the volume count. The entries are copies of a real manifest entry
(a 40 x 40 x 32 phantom with its label, about 0.9 KB as one JSON line); nothing but the manifest is
written. Bytes are the file sizes written (the journal's lines plus the compacted manifest, or the sum
of every rewritten manifest); seconds are wall-clock on this machine's disk under ``--dir``.

Run::

    python benchmarks/bench_manifest.py --volumes 100 1000 10000 --rewrite-max 2000 --dir /tmp
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_mae.data import preprocess_dataset, write_synthetic_dataset
from monai_mae.data.preprocess.manifest import JOURNAL_NAME, MANIFEST_NAME, ManifestJournal
from monai_mae.utils import atomic_write

__all__ = ["main", "sample_entry", "time_journal", "time_rewrite"]


def sample_entry(folder: Path) -> dict[str, Any]:
    """A real manifest entry: one 40 x 40 x 32 phantom with its label, preprocessed with the CT preset."""
    write_synthetic_dataset(folder / "raw", num=1, num_validation=0, shape=(40, 40, 32), num_organs=3)
    return preprocess_dataset(folder / "raw", folder / "pre", "ct", workers=1)["volumes"][0]


def _header(n: int) -> dict[str, Any]:
    return {"splits": {"training": [f"v{i:06d}" for i in range(n)]}, "volumes": [], "skipped": []}


def time_journal(folder: Path, entry: dict[str, Any], n: int) -> tuple[float, int]:
    """``(seconds, bytes)`` to record ``n`` volumes with :class:`ManifestJournal` and compact once."""
    journal = ManifestJournal(folder, _header(n))
    start = time.perf_counter()
    journal.open()
    written = (folder / MANIFEST_NAME).stat().st_size
    for i in range(n):
        journal.add_volume({**entry, "name": f"v{i:06d}"})
    written += (folder / JOURNAL_NAME).stat().st_size
    journal.close()
    seconds = time.perf_counter() - start
    return seconds, written + (folder / MANIFEST_NAME).stat().st_size


def time_rewrite(folder: Path, entry: dict[str, Any], n: int) -> tuple[float, int]:
    """``(seconds, bytes)`` to record ``n`` volumes by rewriting the whole manifest atomically after each."""
    manifest = {**_header(n), "complete": False}
    written = 0
    start = time.perf_counter()
    for i in range(n):
        manifest["volumes"].append({**entry, "name": f"v{i:06d}"})
        manifest["complete"] = i == n - 1
        text = json.dumps(manifest, indent=1) + "\n"
        atomic_write(folder / MANIFEST_NAME, lambda f: f.write(text), mode="w")
        written += len(text.encode("utf-8"))
    return time.perf_counter() - start, written


def main(argv: Sequence[str] | None = None) -> int:
    """Print a markdown table: volumes, scheme, seconds, MB written, bytes per volume."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, nargs="+", default=[100, 1000, 10000], help="volume counts")
    parser.add_argument("--rewrite-max", type=int, default=2000, help="largest count timed with 'rewrite'")
    parser.add_argument("--dir", default=None, help="folder for the temporary files (default: the system's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        entry = sample_entry(Path(root))
        print(f"# one entry: {len(json.dumps(entry))} bytes as a JSON line; temporary files under {root}")
        print("| volumes | scheme | seconds | MB written | bytes per volume |")
        print("| ---: | --- | ---: | ---: | ---: |")
        for n in args.volumes:
            schemes = [("journal", time_journal)] + ([("rewrite", time_rewrite)] if n <= args.rewrite_max else [])
            for name, measure in schemes:
                folder = Path(root) / f"{name}_{n}"
                folder.mkdir()
                seconds, written = measure(folder, entry, n)
                print(f"| {n} | {name} | {seconds:.2f} | {written / 1e6:.1f} | {written / n:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
