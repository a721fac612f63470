"""The manifest of a preprocessed folder: reading and checking it, and the journal a run records volumes in.

A finished run leaves ``OUT_DIR/manifest.json``: format and package version, the resolved preset,
the storage settings, the splits, one entry per volume and the skipped volumes (see
:func:`~monai_mae.data.preprocess.preprocess_dataset`). While a run is in progress the same file
holds what was known at its start (``"complete": false``) and each finished volume is appended as one
JSON line to ``OUT_DIR/manifest.journal`` (:class:`ManifestJournal`): the bytes written per volume do
not grow with the number of volumes already done. At the end of the run (also when it stops on an
error) the journal is compacted into ``manifest.json`` and removed. :func:`read_manifest` folds a
journal left by a killed run into what it returns, so a folder reads the same whether its records
are in ``manifest.json`` or still in the journal; a folder written before the journal existed
(everything in ``manifest.json``) reads as before.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# the manifest's file name and its "format" entry are defined beside declared_classes, which reads its labels
from monai_mae.data.datalist import MANIFEST_FORMAT as FORMAT
from monai_mae.data.datalist import MANIFEST_NAME
from monai_mae.data.preprocess.settings import preprocess_settings
from monai_mae.utils import atomic_write, read_json
from monai_mae.version import __version__

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "JOURNAL_NAME",
    "MANIFEST_NAME",
    "ManifestJournal",
    "check_manifest",
    "listed",
    "load_manifest",
    "manifest_path",
    "missing_files",
    "now",
    "read_manifest",
    "split_volumes",
]

logger = logging.getLogger(__name__)

#: Version of the folder layout and manifest written by :func:`~monai_mae.data.preprocess.preprocess_dataset`.
FORMAT_VERSION = 1
#: File name of the journal of a run in progress (JSON lines), beside the manifest.
JOURNAL_NAME = "manifest.journal"
_COMPARED = ("modality", "pixdim", "orientation", "intensity")  # what a training run must agree on
_MAX_LISTED = 10  # names listed in one message


def now() -> str:
    """The current UTC time, ISO 8601 to the second (the manifest's ``created`` and ``updated``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def listed(items: list[str]) -> str:
    """The first few of ``items``, one per indented line, and how many more there are."""
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "\n  ".join(items[:_MAX_LISTED]) + more


def manifest_path(out_dir: str | os.PathLike[str]) -> Path:
    """``OUT_DIR/manifest.json``, or ``out_dir`` itself when it names an existing manifest file."""
    path = Path(out_dir)
    return path if path.name == MANIFEST_NAME and path.is_file() else path / MANIFEST_NAME


# --------------------------------------------------------------------------------------------------
# the journal: records applied to a manifest, by the writer and by the reader alike
# --------------------------------------------------------------------------------------------------


def _apply(record: Mapping[str, Any], volumes: dict[str, Any], skipped: dict[str, Any], splits: dict) -> None:
    """Apply one journal record (``{"volume": entry}`` or ``{"skipped": {...}}``); applying it twice is harmless."""
    if "volume" in record:
        entry = record["volume"]
        volumes[entry["name"]] = entry
    elif "skipped" in record:
        item = record["skipped"]
        skipped[item["name"]] = item
        volumes.pop(item["name"], None)
        names = splits.get(item["split"], [])
        if item["name"] in names:
            names.remove(item["name"])
    else:
        raise ValueError(f"unknown journal record with keys {sorted(record)}")


def _ordered(volumes: Mapping[str, Any], splits: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    """The entries of ``volumes`` in datalist order: the order of the names in ``splits``."""
    return [volumes[name] for names in splits.values() for name in names if name in volumes]


def _read_journal(path: Path) -> list[dict[str, Any]]:
    """The records of a journal; a line that does not parse (a write cut short by a kill) is left out."""
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines) - 1:  # not the last line: say so (its volume will be redone)
                logger.warning(f"{path}:{number}: a damaged record is ignored; a rerun redoes its volume")
    return records


def _fold_journal(manifest: dict[str, Any], journal: Path) -> dict[str, Any]:
    """``manifest`` with the records of ``journal`` applied (volumes in datalist order)."""
    splits = {split: list(names) for split, names in manifest.get("splits", {}).items()}
    volumes = {entry["name"]: entry for entry in manifest.get("volumes", [])}
    skipped = {item["name"]: item for item in manifest.get("skipped", [])}
    for record in _read_journal(journal):
        _apply(record, volumes, skipped, splits)
    return {**manifest, "splits": splits, "volumes": _ordered(volumes, splits), "skipped": list(skipped.values())}


class ManifestJournal:
    """The manifest of a run in progress: ``manifest.json`` written at the start and at the end, one line per volume.

    :meth:`open` writes ``manifest`` (the run's header and the volumes already done) atomically as
    ``manifest.json`` and starts an empty journal; :meth:`add_volume` and :meth:`add_skipped` append
    one JSON line each to ``manifest.journal`` (one ``write`` on a file opened for appending, so a kill
    leaves at most the last line cut short, which readers skip); :meth:`close` compacts: it writes the
    whole manifest (``"complete"`` when every planned volume is recorded) atomically and removes the
    journal. Bytes written: the two manifests plus one line per volume, linear in the number of
    volumes. The journal is not fsync-ed per line: a record lost in a power cut makes the next run
    redo that volume (every recorded file is checked against its recorded size before it is kept).

    Args:
        out_dir: the output folder.
        manifest: the manifest at the start of the run (``splits`` list the planned volumes,
            ``volumes`` those already done, ``skipped`` those refused by the input checks).

    Examples::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     journal = ManifestJournal(folder, {"splits": {"training": ["a", "b"]}, "volumes": [], "skipped": []})
        ...     journal.open()
        ...     journal.add_volume({"name": "b", "split": "training"})
        ...     journal.add_skipped({"name": "a", "split": "training", "source": {}, "reasons": ["bad"]})
        ...     manifest = journal.close()
        ...     sorted(p.name for p in Path(folder).iterdir())
        ['manifest.json']
        >>> manifest["complete"], manifest["splits"], [v["name"] for v in manifest["volumes"]]
        (True, {'training': ['b']}, ['b'])
    """

    def __init__(self, out_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / JOURNAL_NAME
        self.manifest = dict(manifest)
        self.splits = {split: list(names) for split, names in manifest["splits"].items()}
        self.volumes = {entry["name"]: entry for entry in manifest.get("volumes", [])}
        self.skipped = {item["name"]: item for item in manifest.get("skipped", [])}
        self._fd: int | None = None

    @property
    def planned(self) -> int:
        """How many volumes the run is to record (the planned ones less those skipped)."""
        return sum(len(names) for names in self.splits.values())

    def snapshot(self) -> dict[str, Any]:
        """The whole manifest as recorded so far."""
        complete = len(self.volumes) == self.planned
        return {
            **self.manifest,
            "complete": complete,
            "splits": {split: list(names) for split, names in self.splits.items()},
            "volumes": _ordered(self.volumes, self.splits),
            "skipped": list(self.skipped.values()),
        }

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = now()
        text = json.dumps(manifest, indent=1) + "\n"
        atomic_write(self.out_dir / MANIFEST_NAME, lambda f: f.write(text), mode="w")

    def open(self) -> None:
        """Remove a journal a killed run left (its records are folded in already), write the manifest, start anew."""
        self.path.unlink(missing_ok=True)  # first: a crash before the new manifest only loses records, never mixes runs
        self._write_manifest(self.snapshot())
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _append(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise RuntimeError(f"{self.path}: the journal is not open; call open() first.")
        _apply(record, self.volumes, self.skipped, self.splits)
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        while written < len(line):  # a short write (rare: a signal): write the rest
            written += os.write(self._fd, line[written:])

    def add_volume(self, entry: dict[str, Any]) -> None:
        """Record a finished volume (its manifest entry)."""
        self._append({"volume": entry})

    def add_skipped(self, item: dict[str, Any]) -> None:
        """Record a volume skipped during the run (``name``, ``split``, ``source``, ``reasons``)."""
        self._append({"skipped": item})

    def close(self) -> dict[str, Any]:
        """Compact: write the whole manifest atomically, remove the journal; returns the manifest."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        manifest = self.snapshot()
        self._write_manifest(manifest)
        self.path.unlink(missing_ok=True)
        return manifest


# --------------------------------------------------------------------------------------------------
# reading and checking
# --------------------------------------------------------------------------------------------------


def load_manifest(path: Path) -> dict[str, Any]:
    """Read a manifest (with the journal of a run in progress folded in) and check its format and version.

    Completeness and files are the caller's business (:func:`read_manifest`).
    """
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: not a monai_mae preprocessing manifest (format {found!r}, expected {FORMAT!r}).")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: manifest format version {version!r} (written by monai_mae {manifest.get('package_version')}), "
            f"but monai_mae {__version__} reads format version {FORMAT_VERSION}; preprocess the dataset again into a "
            "new folder."
        )
    journal = path.parent / JOURNAL_NAME
    return _fold_journal(manifest, journal) if journal.is_file() else manifest


def missing_files(out_dir: Path, entry: Mapping[str, Any]) -> list[str]:
    """Output files of a manifest entry that are absent or not of the recorded size."""
    problems = []
    for key, rel in entry["files"].items():
        path = out_dir / rel
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"][key]:
            what = "missing" if size is None else f"{size} bytes, expected {entry['bytes'][key]}"
            problems.append(f"{path} ({what})")
    return problems


def read_manifest(
    out_dir: str | os.PathLike[str], *, require_complete: bool = True, check_files: bool = True
) -> dict[str, Any]:
    """Read the manifest of a preprocessed folder, checking that it can be trained from.

    Args:
        out_dir: the folder written by :func:`~monai_mae.data.preprocess.preprocess_dataset` (or its
            ``manifest.json``).
        require_complete: keyword-only. Refuse a manifest of a run that has not finished. Defaults to True.
        check_files: keyword-only. Every recorded output file must exist with its recorded size
            (a ``stat`` per file, nothing is read). Defaults to True.

    Returns:
        The manifest as a dict (see :func:`~monai_mae.data.preprocess.preprocess_dataset`); for a run
        in progress or killed, with the volumes its journal records.

    Raises:
        FileNotFoundError: when there is no manifest (the message says how to make one).
        ValueError: for malformed JSON (file, line, column), a file that is not a preprocessing
            manifest, another format version (both named), an incomplete run (with
            ``require_complete``), or missing / wrongly sized output files (named).

    Examples::

        manifest = read_manifest("/data/preprocessed/ct")
        [v["name"] for v in manifest["volumes"] if v["split"] == "validation"]
    """
    path = manifest_path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {path.parent} holds no preprocessed dataset (or its preprocessing never started). "
            f"Make one with: python -m monai_mae.data.preprocess DATASET_DIR {path.parent} --modality ct|mri"
        )
    manifest = load_manifest(path)
    if require_complete and not manifest.get("complete", False):
        planned = sum(len(names) for names in manifest.get("splits", {}).values())
        raise ValueError(
            f"{path}: incomplete preprocessing, {len(manifest.get('volumes', []))} of {planned} volumes done (the run "
            "stopped early); run the same preprocess command again to finish it (finished volumes are kept)."
        )
    if check_files:
        bad = [p for entry in manifest.get("volumes", []) for p in missing_files(path.parent, entry)]
        if bad:
            raise ValueError(
                f"{path}: {len(bad)} recorded output file(s) are missing or damaged; run the same preprocess command "
                f"again to redo those volumes:\n  {listed(bad)}"
            )
    return manifest


def check_manifest(
    manifest_or_dir: Mapping[str, Any] | str | os.PathLike[str], preset: str | os.PathLike[str] | Mapping[str, Any]
) -> dict[str, Any]:
    """Check that a preprocessed folder was made with the data settings of this run.

    Compared: modality, spacing (``pixdim``, to 1e-6 relative), orientation and the intensity
    settings (CT window or MRI normalisation), each resolved as
    :func:`~monai_mae.data.preprocess.preprocess_settings` does.

    Args:
        manifest_or_dir: a manifest dict or a folder read with :func:`read_manifest`.
        preset: the run's data preset (dict, name or JSON path); keys unrelated to the stored
            volumes (``roi_size``, ``num_samples``, ...) are ignored.

    Returns:
        The manifest.

    Raises:
        ValueError: naming each differing setting with the manifest's value and the preset's value;
            and the errors of :func:`read_manifest` and ``preprocess_settings``.

    Examples::

        manifest = check_manifest("/data/preprocessed/ct", load_data_preset("ct"))
    """
    if isinstance(manifest_or_dir, Mapping):
        manifest, where = dict(manifest_or_dir), "the manifest"
    else:
        manifest, where = read_manifest(manifest_or_dir), str(manifest_path(manifest_or_dir))
    stored = manifest["preset"]["settings"]
    wanted = preprocess_settings(preset)
    differences = []
    for key in _COMPARED:
        a, b = stored.get(key), wanted[key]
        if key == "pixdim" and a is not None and b is not None:
            same = np.allclose(a, b, rtol=1e-6, atol=0.0)
        else:
            same = a == b
        if not same:
            differences.append(f"{key}: {where} has {a!r}, the run's preset has {b!r}")
    if differences:
        raise ValueError(
            f"the preprocessed data does not match the run's data preset ({'; '.join(differences)}). Preprocess the "
            "dataset again with this preset, or train with the preset the folder was made with."
        )
    return manifest


def split_volumes(
    manifest: Mapping[str, Any], split: str, where: str | os.PathLike[str], *, with_label: bool = False
) -> list[dict[str, Any]]:
    """The manifest entries of ``split``, in order; each with a label when ``with_label``.

    Args:
        manifest: a manifest from :func:`read_manifest`.
        split: a split of the manifest (``"training"``, ``"validation"``).
        where: the folder, named in the errors.
        with_label: keyword-only. Every volume must have a label. Defaults to False.

    Raises:
        ValueError: for an empty or absent split (lists the volumes per split), or, with
            ``with_label``, volumes without a label (named).

    Examples::

        >>> manifest = {"splits": {"training": ["a"]}, "volumes": [{"name": "a", "files": {"image": "images/a.npy"}}]}
        >>> [v["name"] for v in split_volumes(manifest, "training", "/data/pre")]
        ['a']
        >>> split_volumes(manifest, "training", "/data/pre", with_label=True)
        Traceback (most recent call last):
        ...
        ValueError: /data/pre: 1 volume(s) of 'training' have no label, e.g. ['a']; training with labels ...
    """
    names = manifest["splits"].get(split) or []
    if not names:
        present = {s: len(n) for s, n in manifest["splits"].items()}
        raise ValueError(f"{where}: no volumes in split {split!r}; volumes per split: {present}.")
    by_name = {entry["name"]: entry for entry in manifest["volumes"]}
    volumes = [by_name[name] for name in names]
    if with_label:
        unlabelled = [entry["name"] for entry in volumes if "label" not in entry["files"]]
        if unlabelled:
            raise ValueError(
                f"{where}: {len(unlabelled)} volume(s) of {split!r} have no label, e.g. {unlabelled[:_MAX_LISTED]}; "
                "training with labels (fine-tuning) needs a folder preprocessed with them (without --no-labels)."
            )
    return volumes
