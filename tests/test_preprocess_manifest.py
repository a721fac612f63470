"""The preprocessing manifest (``monai_mae.data.preprocess.manifest``): a run records each volume as one journal
line and compacts at the end, so the bytes written grow linearly with the number of volumes (10,000 fake volumes);
a journal left by an interrupted run is read and resumed from; a folder written before the journal existed
(``tests/data/preprocessed_format1``, made by the earlier single-file writer) reads as before; the folder lock."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from monai_mae.data import (
    PreprocessedCropDataset,
    PreprocessedVolumeDataset,
    check_manifest,
    class_names,
    preprocess_dataset,
    read_manifest,
)
from monai_mae.data.preprocess import runner
from monai_mae.data.preprocess.manifest import JOURNAL_NAME, ManifestJournal

FORMAT1 = Path(__file__).resolve().parent / "data" / "preprocessed_format1"


def _key_paths(value, prefix: str = "") -> set[str]:
    """Every key path of a JSON value (lists of dicts through their first item)."""
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in {f"{prefix}/{k}"} | _key_paths(v, f"{prefix}/{k}")}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _key_paths(value[0], f"{prefix}[]")
    return set()


# --------------------------------------------------------------------------------------------------
# a folder of the first format, written before the journal existed
# --------------------------------------------------------------------------------------------------


def test_a_folder_of_the_first_format_reads_as_before(preprocessed):
    manifest = read_manifest(FORMAT1)
    assert manifest["complete"] and manifest["format_version"] == 1
    assert manifest["splits"] == {"training": ["phantom_000"], "validation": ["phantom_001"]}
    assert check_manifest(FORMAT1, "ct") == manifest
    ds = PreprocessedCropDataset(FORMAT1, roi_size=(8, 8, 6), num_samples=2, with_label=True, seed=0, preset="ct")
    stored = {key: np.load(FORMAT1 / ds.volumes[0]["files"][key]) for key in ("image", "label")}
    assert stored["image"].dtype == np.float16 and stored["label"].dtype == np.uint8
    for crop, (x, y, z) in zip(ds[0], ds.crop_starts(0)):
        for key in ("image", "label"):
            expected = stored[key][:, x : x + 8, y : y + 8, z : z + 6].astype(np.float32)
            assert crop[key].dtype == torch.float32 and np.array_equal(crop[key].numpy(), expected)
    whole = PreprocessedVolumeDataset(FORMAT1, with_label=True, preset="ct")[0]
    assert tuple(whole["image"].shape) == tuple(manifest["volumes"][1]["shape"]) == (1, 16, 16, 12)
    # a finished run of this code leaves a manifest of the same structure, plus the datalist's labels (0.3.0)
    now = {path for path in _key_paths(read_manifest(preprocessed)) if not path.startswith("/labels")}
    assert now == _key_paths(json.loads((FORMAT1 / "manifest.json").read_text()))
    assert read_manifest(preprocessed)["labels"] == {"0": "background", "1": "organ_1", "2": "organ_2"}
    assert class_names(FORMAT1, 3) == ["class_1", "class_2"]  # an older folder has no labels: numbered classes


# --------------------------------------------------------------------------------------------------
# the journal
# --------------------------------------------------------------------------------------------------


def test_a_journal_left_by_an_interrupted_run_is_read_and_resumed(phantoms, preprocessed, tmp_path, caplog):
    """What a kill leaves: manifest.json of the run's start (no volume), two journal lines and a torn third."""
    out = tmp_path / "pre"
    shutil.copytree(preprocessed, out)
    full = json.loads((out / "manifest.json").read_text())
    volumes = full["volumes"]
    (out / "manifest.json").write_text(json.dumps({**full, "complete": False, "volumes": []}))
    lines = [json.dumps({"volume": volumes[i]}) for i in (1, 0, 2)]  # in the order the workers finished
    (out / JOURNAL_NAME).write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:40])
    (out / "images/phantom_002.npy").unlink()  # the volume of the torn line was not finished either
    seen = read_manifest(out, require_complete=False, check_files=False)
    assert [v["name"] for v in seen["volumes"]] == ["phantom_000", "phantom_001"]  # datalist order
    assert not seen["complete"]
    with pytest.raises(ValueError, match=r"incomplete preprocessing, 2 of 3 volumes done"):
        read_manifest(out)
    kept = {v["name"]: (out / v["files"]["image"]).stat().st_ino for v in seen["volumes"]}
    caplog.set_level(logging.INFO, logger="monai_mae.data.preprocess")
    resumed = preprocess_dataset(phantoms, out, "ct", workers=1)
    progress = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("[")]
    assert progress == ["[1/1] phantom_002"]
    assert resumed["complete"] and not (out / JOURNAL_NAME).exists()
    assert all((out / f"images/{name}.npy").stat().st_ino == ino for name, ino in kept.items())
    strip = lambda m: [{k: v for k, v in e.items() if k != "seconds"} for e in m["volumes"]]  # noqa: E731
    assert strip(read_manifest(out)) == strip(full)


def test_the_journal_records_skips_and_compacts(tmp_path):
    header = {"splits": {"training": ["a", "b"], "validation": ["c"]}, "volumes": [], "skipped": []}
    journal = ManifestJournal(tmp_path, header)
    journal.open()
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"] is False
    journal.add_volume({"name": "c", "split": "validation"})
    journal.add_skipped({"name": "a", "split": "training", "source": {}, "reasons": ["failed"]})
    journal.add_volume({"name": "b", "split": "training"})
    assert len((tmp_path / JOURNAL_NAME).read_text().splitlines()) == 3
    assert json.loads((tmp_path / "manifest.json").read_text())["volumes"] == []  # untouched until the end
    manifest = journal.close()
    assert manifest == json.loads((tmp_path / "manifest.json").read_text()) and not (tmp_path / JOURNAL_NAME).exists()
    assert manifest["complete"] and manifest["splits"] == {"training": ["b"], "validation": ["c"]}
    assert [v["name"] for v in manifest["volumes"]] == ["b", "c"] and manifest["skipped"][0]["reasons"] == ["failed"]
    with pytest.raises(RuntimeError, match="the journal is not open"):
        journal.add_volume({"name": "b", "split": "training"})


def _bytes_written() -> int:
    """Bytes this process has passed to write() so far (Linux's /proc/self/io)."""
    text = Path("/proc/self/io").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("wchar:")))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="bytes written are read from Linux's /proc/self/io")
def test_bytes_written_grow_linearly_with_ten_thousand_volumes(preprocessed, tmp_path, monkeypatch):
    """The run's own loop records 10,000 fake volumes (the per-volume work replaced): what it writes is the journal
    line and the compacted entry of each volume, not the whole manifest again after each one."""
    n = 10_000
    entry = read_manifest(preprocessed)["volumes"][0]
    dataset = tmp_path / "raw"
    dataset.mkdir()
    (dataset / "datalist.json").write_text("{}")

    def plan(dataset_dir, out, labels, common):
        return [{"name": f"v{i:05d}", "split": "training", "source": {"image": f"/raw/v{i:05d}.nii.gz"},
                 "files": entry["files"], **common, "out_dir": str(out)} for i in range(n)]  # fmt: skip

    monkeypatch.setattr(runner, "plan_jobs", plan)
    monkeypatch.setattr(runner, "check_job", lambda job: {"reasons": [], "bytes": 0})
    monkeypatch.setattr(runner, "write_volume", lambda job: {"entry": {**entry, "name": job["name"]}})
    before = _bytes_written()
    manifest = preprocess_dataset(dataset, tmp_path / "pre", "ct", workers=1)
    written = _bytes_written() - before
    assert manifest["complete"] and len(manifest["volumes"]) == n and not (tmp_path / "pre" / JOURNAL_NAME).exists()
    assert [v["name"] for v in manifest["volumes"][:2]] == ["v00000", "v00001"]
    per_volume = len(json.dumps(entry)) + len(json.dumps(entry, indent=1))  # a journal line + a compacted entry
    assert (tmp_path / "pre" / "manifest.json").stat().st_size < n * per_volume
    assert written < 2 * n * per_volume, f"{written} bytes written for {n} volumes ({written / n:.0f} per volume)"


# --------------------------------------------------------------------------------------------------
# the lock
# --------------------------------------------------------------------------------------------------


def test_a_folder_locked_by_another_run_is_refused(phantoms, preprocessed, tmp_path):
    out = tmp_path / "pre"
    shutil.copytree(preprocessed, out)
    before = (out / "manifest.json").read_text()
    with FileLock(str(out / ".preprocess.lock"), timeout=0):
        with pytest.raises(RuntimeError, match=r"pre is being preprocessed by another run \(it holds .*\.preprocess"):
            preprocess_dataset(phantoms, out, "ct", workers=1)
    assert (out / "manifest.json").read_text() == before
    assert preprocess_dataset(phantoms, out, "ct", workers=1)["complete"]  # released: the next run goes ahead
