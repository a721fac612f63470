"""The bundles' ``preprocessed_dir``: the run's check of the folder before anything is built.

Training and validation data come from the datasets of :mod:`monai_mae.data.crops`
(:class:`~monai_mae.data.PreprocessedCropDataset`, :class:`~monai_mae.data.PreprocessedCentreCropDataset`,
:class:`~monai_mae.data.PreprocessedVolumeDataset`); this module adds what a bundle run needs around
them: :func:`check_preprocessed_dir` (the folder exists, is complete and was made with the run's data
preset; one log line says so and that ``cache`` is ignored) and :func:`refuse_preprocessed_dir` (a
config that reads NIfTI only stops when ``preprocessed_dir`` is set).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from monai_mae.data.crops import PreprocessedCentreCropDataset, PreprocessedVolumeDataset
from monai_mae.data.preprocess.manifest import check_manifest, read_manifest, split_volumes

# the datasets live in monai_mae.data.crops; the bundles name them monai_mae.engines.PreprocessedCentreCropDataset
# and monai_mae.engines.PreprocessedVolumeDataset, which monai_mae.engines imports from here
__all__ = [
    "PreprocessedCentreCropDataset",
    "PreprocessedVolumeDataset",
    "check_preprocessed_dir",
    "refuse_preprocessed_dir",
]

logger = logging.getLogger(__name__)


def check_preprocessed_dir(
    preprocessed_dir: str | os.PathLike[str],
    preset: str | os.PathLike[str] | Mapping[str, Any],
    cache: str | None = None,
    *,
    with_label: bool = False,
    log: bool = True,
) -> dict[str, Any]:
    """Check a bundle's ``preprocessed_dir`` before the run builds anything, and say once what it changes.

    Args:
        preprocessed_dir: folder written by ``python -m monai_mae.data.preprocess``.
        preset: the run's data preset (modality, ``pixdim``, CT window), compared with the folder's by
            :func:`~monai_mae.data.check_manifest`.
        cache: the run's ``cache`` setting, named in the log line as ignored. Defaults to None.
        with_label: keyword-only. Every volume of both splits must have a label (fine-tuning).
            Defaults to False.
        log: keyword-only. Write the log line (False on all ranks but one). Defaults to True.

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: when the folder holds no ``manifest.json`` (the message names it and how to make one).
        ValueError: a setting of the folder differs from the run's preset (both values named), the
            preprocessing is incomplete or its files are damaged, a split is empty, or, with
            ``with_label``, volumes without a label (named).

    Examples::

        manifest = check_preprocessed_dir("/data/pre/ct", load_data_preset("ct"), cache="none")
    """
    if not os.fspath(preprocessed_dir).strip():
        raise ValueError("preprocessed_dir is empty; pass the folder written by python -m monai_mae.data.preprocess.")
    manifest = check_manifest(read_manifest(preprocessed_dir), preset)
    counts = {
        split: len(split_volumes(manifest, split, preprocessed_dir, with_label=with_label))
        for split in ("training", "validation")
    }
    if log:
        settings = manifest["preset"]["settings"]
        logger.info(
            f"preprocessed_dir={os.fspath(preprocessed_dir)!r}: training and validation read its .npy volumes "
            f"({counts['training']} training, {counts['validation']} validation; modality {settings['modality']}, "
            f"pixdim {settings['pixdim']}, intensity {settings['intensity']}); cache={cache!r} is ignored and "
            "dataset_dir is not read."
        )
    return manifest


def refuse_preprocessed_dir(preprocessed_dir: Any, config: str) -> None:
    """Stop a config that reads NIfTI volumes only (e.g. ``mae_finetune``'s ``evaluate.json``) when ``preprocessed_dir`` is set.

    Raises:
        ValueError: naming the config and the folder, so that a half-switched run (datalist from
            ``dataset_dir``, volumes from the folder) never starts.
    """
    if preprocessed_dir:
        raise ValueError(
            f"{config} scores the NIfTI volumes of dataset_dir in their original space and does not read "
            f"preprocessed_dir={str(preprocessed_dir)!r}; leave preprocessed_dir unset for it."
        )
