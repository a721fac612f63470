"""The preprocessing run: plan, resume, check, then write every volume under a lock, recording each in the journal.

:func:`preprocess_dataset` is the whole run; its stages are the functions below it, in the order it
calls them. Work on volumes runs through :func:`run_jobs`, in this process or in a process pool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from monai.utils import look_up_option

from monai_mae.data.datalist import declared_classes, load_datalist
from monai_mae.data.nnunet_raw import is_nnunet_raw, read_nnunet_raw
from monai_mae.data.preprocess.checks import check_disk_space, check_job, files_of, format_size
from monai_mae.data.preprocess.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ManifestJournal,
    load_manifest,
    missing_files,
    now,
)
from monai_mae.data.preprocess.settings import (
    FOREGROUND_MARGIN,
    IMAGE_DTYPES,
    as_pixdim,
    preprocess_settings,
    require_int,
    resolve_preset,
    storage_settings,
)
from monai_mae.data.preprocess.writer import write_volume
from monai_mae.utils import read_json
from monai_mae.version import __version__

__all__ = ["LOCK_NAME", "SPLITS", "default_workers", "plan_jobs", "preprocess_dataset", "run_jobs"]

logger = logging.getLogger(__name__)

#: The datalist lists a run preprocesses, in this order.
SPLITS = ("training", "validation")
#: The lock file inside the output folder (held with ``filelock`` while a run writes there).
LOCK_NAME = ".preprocess.lock"


def default_workers() -> int:
    """``min(8, os.cpu_count())``: the default number of worker processes."""
    return min(8, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------
# the process pool
# --------------------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Iterator[tuple[Any, Any]]:
    """Yield ``(job, fn(job))`` as the jobs finish: in this process for ``workers <= 1``, else in a process pool.

    Closing the generator early cancels the jobs not started and waits for the running ones.

    Raises:
        RuntimeError: when a worker process dies (naming a volume it may have been working on).
    """
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, fn(job)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(threads,)) as pool:
        pending: dict[Future, Any] = {pool.submit(fn, job): job for job in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool as err:
                        raise RuntimeError(
                            f"a preprocessing worker process died (out of memory?) while working on {job['name']} or "
                            f"another volume: {err}; rerun with fewer --workers (finished volumes are kept)."
                        ) from err
                    yield job, result
        finally:
            for future in pending:
                future.cancel()


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def preprocess_dataset(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    modality: str,
    *,
    preset: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    spacing: Sequence[float] | float | None = None,
    margin: int = FOREGROUND_MARGIN,
    in_channels: int = 1,
    image_dtype: str = "float16",
    labels: bool = True,
) -> dict[str, Any]:
    """Apply the deterministic transforms of a data preset once to every volume of a Decathlon datalist.

    Steps, in order (nothing is written before step 4):

    1. ``DATASET_DIR/datalist.json`` is read (its ``"training"`` and ``"validation"`` lists, with
       :func:`~monai_mae.data.load_datalist`); a missing datalist is an error naming the folder (no
       synthetic data is generated here). An nnU-Net raw folder without ``datalist.json`` is read as
       :func:`~monai_mae.data.load_datalist` reads it (``imagesTr`` split into the two lists).
    2. Resume: if ``OUT_DIR`` holds a manifest, its settings must equal this run's (else an error
       naming both); volumes whose entry exists (in the manifest or the journal a killed run left),
       whose source files are the same and whose output files exist with the recorded size are kept;
       all others (also torn outputs of a killed run) are redone.
    3. Every volume still to do is checked (:func:`~monai_mae.data.check_volume` on each file: a
       readable, complete NIfTI, 3D or 4D with ``in_channels``, finite non-singular affine, not all
       NaN/Inf, a label of non-negative integers; image and label of the same shape and grid). Bad
       volumes stop the run with one ``ValueError`` naming each file and why, or with ``skip_bad``
       are skipped with a warning and listed under ``"skipped"`` in the manifest. The disk space
       needed (an upper bound from the headers: the resampled shape times the bytes per voxel) and
       the free space on ``OUT_DIR``'s disk are logged; the run stops if it does not fit.
    4. Under the lock ``OUT_DIR/.preprocess.lock`` (``filelock``: one run per folder; the operating
       system releases it when a run dies), the volumes are processed in ``workers`` processes with
       :func:`~monai_mae.data.preprocess.get_deterministic_transforms` and written atomically
       (temporary file, fsync, ``os.replace``); each finished volume is appended as one line to
       ``OUT_DIR/manifest.journal`` and a progress line (i/N, name, seconds, MB) is logged. At the
       end (also after an error) the journal is compacted into ``manifest.json``
       (:class:`~monai_mae.data.preprocess.manifest.ManifestJournal`).

    Args:
        dataset_dir: folder with ``datalist.json`` (paths relative to it).
        out_dir: output folder, created if needed.
        modality: ``"ct"`` or ``"mri"``; must agree with the preset's modality.
        preset: keyword-only. Data preset name, JSON path or dict; defaults to the packaged preset of
            ``modality``.
        workers: keyword-only. Worker processes; ``<= 1`` works in this process. Defaults to
            ``min(8, os.cpu_count())``.
        skip_bad: keyword-only. Skip volumes that fail the input checks or the preprocessing, with a
            warning, instead of stopping. Defaults to False.
        spacing: keyword-only. Overrides the preset's ``pixdim`` (mm, one or three numbers). Defaults to None.
        margin: keyword-only. Voxels kept around the foreground box. Defaults to ``FOREGROUND_MARGIN`` (4).
        in_channels: keyword-only. Channels of each image (a 4D file's 4th axis, or one file per
            channel). Defaults to 1.
        image_dtype: keyword-only. ``"float16"`` (default) or ``"float32"``.
        labels: keyword-only. Also store the labels the datalist names. Defaults to True.

    Returns:
        The final manifest: ``format``, ``format_version``, ``package_version``, ``complete``,
        ``created``, ``updated``, ``dataset_dir``, ``labels`` (the label values and names the source declares,
        :func:`~monai_mae.data.declared_classes`, in the Decathlon form ``{"1": "liver"}``; empty with
        ``labels=False``), ``preset`` (``name``, ``source``, ``settings`` from
        :func:`~monai_mae.data.preprocess.preprocess_settings`, the raw ``preset``), ``storage``
        (layout, order, dtypes, margin), ``splits`` (names per split), ``volumes`` (one entry per
        finished volume: ``name``, ``split``, ``source``, ``files``, ``bytes``, ``shape``, ``dtype``,
        ``spacing``, ``affine``, ``foreground_box``, ``original_shape``, ``original_affine``,
        ``original_spacing``, ``stats`` (min, max, mean, std, p0.5, p99.5 of the stored image),
        ``seconds``) and ``skipped``.

    Raises:
        FileNotFoundError: when ``dataset_dir`` or its ``datalist.json`` is missing.
        ValueError: for bad arguments, a preset whose modality differs from ``modality``, a manifest
            in ``out_dir`` made with other settings, bad input files (without ``skip_bad``; nothing is
            written), or a volume whose preprocessing fails (without ``skip_bad``; finished volumes are
            recorded, a rerun resumes).
        OSError: ``ENOSPC`` when the estimated output does not fit on ``out_dir``'s disk.
        RuntimeError: when another run holds ``out_dir``'s lock, or a worker process dies.

    Examples::

        >>> import tempfile
        >>> from monai_mae.data import PreprocessedCropDataset, write_synthetic_dataset
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = write_synthetic_dataset(f"{folder}/raw", num=2, num_validation=1, shape=(24, 24, 16))
        ...     manifest = preprocess_dataset(f"{folder}/raw", f"{folder}/pre", "ct", workers=1)
        ...     crops = PreprocessedCropDataset(f"{folder}/pre", roi_size=(16, 16, 8), num_samples=2)[0]
        >>> manifest["complete"], manifest["splits"], manifest["volumes"][0]["dtype"]
        (True, {'training': ['phantom_000'], 'validation': ['phantom_001']}, {'image': 'float16', 'label': 'uint8'})
        >>> [tuple(c["image"].shape) for c in crops], crops[0]["image"].dtype
        ([(1, 16, 16, 8), (1, 16, 16, 8)], torch.float32)

    From the shell::

        python -m monai_mae.data.preprocess /data/Task03_Liver /data/pre/liver --modality ct --workers 8
    """
    dataset_dir, out = Path(dataset_dir), Path(out_dir)
    _check_dataset_dir(dataset_dir)
    image_dtype = look_up_option(image_dtype, IMAGE_DTYPES)
    in_channels = require_int(in_channels, "in_channels", 1)
    margin = require_int(margin, "margin", 0)
    workers = default_workers() if workers is None else int(workers)
    preset_name, preset_source, raw_preset = resolve_preset(preset, modality)
    if spacing is not None:
        raw_preset = {**raw_preset, "pixdim": as_pixdim(spacing)}
    settings = preprocess_settings(raw_preset)
    storage = storage_settings(image_dtype, margin, in_channels)
    common = {"settings": settings, "margin": margin, "image_dtype": image_dtype, "in_channels": in_channels}
    jobs = plan_jobs(dataset_dir, out, labels, common)
    declared = {str(v): name for v, name in sorted(declared_classes(dataset_dir).items())} if labels else {}

    previous = _previous_manifest(out, settings, storage)
    done = _finished_volumes(previous, jobs, out)
    todo = [job for job in jobs if job["name"] not in done]
    if done:
        logger.info(f"preprocess: {len(done)} of {len(jobs)} volumes already done in {out}; {len(todo)} to do")
    todo, skipped = _check_inputs(todo, len(jobs), workers, skip_bad, out)

    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        removed = _remove_temp_files(out)
        if removed:
            logger.info(f"preprocess: removed {removed} temporary file(s) left by an interrupted run")
        skipped_names = {item["name"] for item in skipped}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "complete": False,
            "created": previous.get("created", now()) if previous else now(),
            "updated": None,
            "dataset_dir": str(dataset_dir.absolute()),
            "labels": declared,
            "preset": {"name": preset_name, "source": preset_source, "settings": settings, "preset": raw_preset},
            "storage": storage,
            "splits": {
                split: [j["name"] for j in jobs if j["split"] == split and j["name"] not in skipped_names]
                for split in {j["split"]: None for j in jobs}
            },  # fmt: skip
            "volumes": [done[job["name"]] for job in jobs if job["name"] in done],
            "skipped": skipped,
        }
        journal = ManifestJournal(out, manifest)
        journal.open()
        try:
            _write_volumes(todo, journal, workers, skip_bad)
        finally:
            manifest = journal.close()
    total = sum(sum(entry["bytes"].values()) for entry in manifest["volumes"])
    logger.info(
        f"preprocess: {len(manifest['volumes'])} volume(s), {format_size(total)} in {out}"
        + (f"; {len(manifest['skipped'])} skipped" if manifest["skipped"] else "")
    )
    return manifest


def _check_dataset_dir(dataset_dir: Path) -> None:
    """``FileNotFoundError`` naming the folder when it, or its ``datalist.json``, is missing."""
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {dataset_dir} not found.")
    if not (dataset_dir / "datalist.json").is_file() and not is_nnunet_raw(dataset_dir):
        raise FileNotFoundError(
            f"{dataset_dir} has no datalist.json: expected a Decathlon-style JSON file with 'training' (and "
            f"'validation') lists of image/label paths relative to {dataset_dir}, or an nnU-Net raw folder "
            "(dataset.json with channel_names, imagesTr/). (The preprocessing never generates "
            "synthetic data; for phantoms run python -m monai_mae.data.synthetic DATASET_DIR first.)"
        )


def volume_name(source: Mapping[str, Any], taken: set[str]) -> str:
    """A file-system-safe name for a volume, from its first image file, unique among ``taken`` (which it joins)."""
    base = os.path.basename(files_of(source["image"])[0])
    for suffix in (".nii.gz", ".nii", ".npy", ".npz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base) or "volume"
    name, k = base, 1
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def plan_jobs(dataset_dir: Path, out: Path, labels: bool, common: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One job per datalist entry of the training and validation lists, in datalist order.

    Args:
        dataset_dir: folder with ``datalist.json``, or an nnU-Net raw folder without one.
        out: the output folder.
        labels: keep the labels the datalist names.
        common: entries every job carries (``settings``, ``margin``, ``image_dtype``, ``in_channels``).

    Returns:
        Dicts with ``name``, ``split``, ``source``, ``files`` (paths relative to ``out``), ``out_dir``
        and the entries of ``common``.
    """
    if (dataset_dir / "datalist.json").is_file():
        raw = read_json(dataset_dir / "datalist.json")
    else:  # an nnU-Net raw folder (checked by _check_dataset_dir)
        raw = read_nnunet_raw(dataset_dir)
    if not isinstance(raw, dict):
        raise ValueError(f"{dataset_dir / 'datalist.json'}: expected a JSON object with a 'training' list.")
    splits = [s for s in SPLITS if isinstance(raw.get(s), list) and raw[s]]
    if not splits:
        raise ValueError(
            f"{dataset_dir / 'datalist.json'}: no non-empty {' or '.join(repr(s) for s in SPLITS)} list; keys "
            f"present: {sorted(raw)}."
        )
    jobs, taken = [], set()
    for split in splits:
        for item in load_datalist(dataset_dir, split):
            source = {"image": item["image"], **({"label": item["label"]} if labels and "label" in item else {})}
            name = volume_name(source, taken)
            files = {"image": f"images/{name}.npy", **({"label": f"labels/{name}.npy"} if "label" in source else {})}
            jobs.append({"name": name, "split": split, "source": source, "files": files, **common, "out_dir": str(out)})
    return jobs


def _previous_manifest(out: Path, settings: Mapping[str, Any], storage: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest a previous run left in ``out``, or None.

    Raises:
        ValueError: naming both values of each setting that differs from this run's.
    """
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    old = load_manifest(path)
    pairs = [(key, old["preset"]["settings"].get(key), value) for key, value in settings.items()]
    pairs += [(f"storage.{key}", old.get("storage", {}).get(key), value) for key, value in storage.items()]
    differences = [f"{key}: {path} has {a!r}, this run has {b!r}" for key, a, b in pairs if a != b]
    if differences:
        raise ValueError(
            f"{out} was preprocessed with other settings ({'; '.join(differences)}); use another OUT_DIR, or "
            f"delete {out} to start again."
        )
    return old


def _finished_volumes(previous: Mapping[str, Any] | None, jobs: Sequence[Mapping[str, Any]], out: Path) -> dict:
    """Entries of ``previous`` still valid for ``jobs``: same source files, output files of the recorded size."""
    if previous is None:
        return {}
    recorded = {entry["name"]: entry for entry in previous.get("volumes", [])}
    done = {}
    for job in jobs:
        entry = recorded.get(job["name"])
        if entry is not None and entry["source"] == job["source"] and not missing_files(out, entry):
            done[job["name"]] = entry
    return done


def _check_inputs(
    todo: list[dict[str, Any]], total: int, workers: int, skip_bad: bool, out: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Check the volumes to do (:func:`~monai_mae.data.preprocess.checks.check_job`) and the disk space they need.

    Returns:
        The volumes to write and the skipped ones (``name``, ``split``, ``source``, ``reasons``).

    Raises:
        ValueError: naming every bad file and why (without ``skip_bad``), or when every volume is bad.
        OSError: ``ENOSPC`` when the estimate does not fit.
    """
    skipped: list[dict[str, Any]] = []
    estimate = 0
    if todo:
        logger.info(f"preprocess: checking {len(todo)} input volume(s) with {workers} worker(s)")
        checks = {job["name"]: result for job, result in run_jobs(check_job, todo, workers)}
        bad = [(job, checks[job["name"]]["reasons"]) for job in todo if checks[job["name"]]["reasons"]]
        if bad and not skip_bad:
            reasons = [reason for _, job_reasons in bad for reason in job_reasons]
            raise ValueError(
                f"{len(bad)} of {total} volumes failed the input checks; nothing was written (pass --skip-bad / "
                "skip_bad=True to skip them):\n  " + "\n  ".join(reasons)
            )
        for job, reasons in bad:
            logger.warning(f"preprocess: skipping {job['name']} (--skip-bad): " + " | ".join(reasons))
            skipped.append({"name": job["name"], "split": job["split"], "source": job["source"], "reasons": reasons})
        if len(bad) == total:
            raise ValueError(f"every one of the {total} volumes failed the input checks; nothing to preprocess.")
        todo = [job for job in todo if not checks[job["name"]]["reasons"]]
        estimate = sum(checks[job["name"]]["bytes"] for job in todo)
    check_disk_space(estimate, out, len(todo))
    return todo, skipped


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold ``OUT_DIR/.preprocess.lock`` (``filelock``) for the block; ``RuntimeError`` while another run holds it.

    The operating system releases the lock of a process that dies, so a killed run leaves no stale lock
    (the empty file stays).
    """
    lock = FileLock(str(out / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeError(
            f"{out} is being preprocessed by another run (it holds {out / LOCK_NAME}); wait for it to finish, or use "
            "another OUT_DIR."
        ) from None
    try:
        yield
    finally:
        lock.release()


def _remove_temp_files(out_dir: Path) -> int:
    """Delete the temporary files an interrupted run left (``.<name>.XXXX.tmp`` of ``atomic_write``)."""
    paths = [*out_dir.glob(f".{MANIFEST_NAME}.*.tmp")]
    for folder in (out_dir / "images", out_dir / "labels"):
        paths += folder.glob(".*.npy.*.tmp") if folder.is_dir() else []
    for path in paths:
        path.unlink(missing_ok=True)
    return len(paths)


def _write_volumes(todo: list[dict[str, Any]], journal: ManifestJournal, workers: int, skip_bad: bool) -> None:
    """Write the volumes (:func:`~monai_mae.data.preprocess.writer.write_volume`), recording each in ``journal``.

    Raises:
        ValueError: the first volume that fails (without ``skip_bad``), after the running ones finish.
    """
    results = run_jobs(write_volume, todo, workers)
    try:
        for i, (job, result) in enumerate(results, start=1):
            if "error" in result and not skip_bad:
                done, planned = len(journal.volumes), journal.planned
                raise ValueError(
                    f"{result['error']} ({done} of {planned} volumes are finished and recorded in "
                    f"{journal.out_dir / MANIFEST_NAME}; fix or remove that volume, or pass --skip-bad, and rerun to "
                    "resume)"
                )
            if "error" in result:
                logger.warning(f"preprocess: skipping {job['name']} (--skip-bad): {result['error']}")
                failed = {"name": job["name"], "split": job["split"], "source": job["source"]}
                journal.add_skipped({**failed, "reasons": [result["error"]]})
                continue
            entry = result["entry"]
            journal.add_volume(entry)
            written = sum(entry["bytes"].values())
            logger.info(f"[{i}/{len(todo)}] {job['name']}: {entry['seconds']:.1f} s, {written / 1e6:.1f} MB")
    finally:
        results.close()  # after a failure: cancel the volumes not started, wait for the running ones
