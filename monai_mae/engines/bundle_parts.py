"""Small factories the bundle configs call where a flat setting picks one part among several.

The JSON of ``bundles/*/configs`` lists its components with literal settings; a choice that depends on
``preprocessed_dir``, ``gpu_augment``, the rank of the process or the number of spatial dimensions is
made here, in Python, instead of an inline ``$... if ... else ...`` expression:

* :func:`first_enabled`: the first component that is not disabled (a component whose ``_disabled_`` is true
  parses to ``None``), e.g. the preprocessed-folder dataset or the NIfTI dataset.
* :func:`ensure_training_data`: what a training config's ``initialize`` checks: the preprocessed folder when
  there is one, otherwise the dataset folder (synthetic phantoms written there only on request).
* :func:`start_process_group` and :func:`rank_zero_handlers`: the steps ``multi_gpu_train.json`` adds.
* :func:`window_inferer`: sliding windows for volumes, slice by slice for 2D models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.handlers import ProgressBar
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer

from monai_mae.data.synthetic import ensure_dataset
from monai_mae.engines.preprocessed import check_preprocessed_dir
from monai_mae.engines.training import LearningRateLogger

__all__ = ["ensure_training_data", "first_enabled", "rank_zero_handlers", "start_process_group", "window_inferer"]

#: handlers that log or draw: one copy (rank 0) is enough in a multi-process run
LOGGING_HANDLERS = (StatsHandler, TensorBoardStatsHandler, LearningRateLogger, ProgressBar)


def first_enabled(*parts: Any) -> Any:
    """The first of ``parts`` that is not ``None``: a bundle component disabled by ``_disabled_`` parses to ``None``.

    Args:
        parts: candidates in order of preference.

    Raises:
        ValueError: when every part is ``None``.

    Examples::

        >>> first_enabled(None, "nifti dataset")
        'nifti dataset'
    """
    for part in parts:
        if part is not None:
            return part
    raise ValueError(f"first_enabled: every one of the {len(parts)} parts is disabled (None); enable one of them.")


def ensure_training_data(
    dataset_dir: str | os.PathLike[str],
    synthetic_if_missing: bool = False,
    *,
    preprocessed_dir: str | os.PathLike[str] | None = "",
    preset: Mapping[str, Any] | None = None,
    cache: str | None = None,
    with_label: bool = False,
    rank: int = 0,
) -> dict[str, Any] | Path | None:
    """Check the data a training run reads before anything is built.

    With ``preprocessed_dir`` the folder is checked against ``preset``
    (:func:`~monai_mae.engines.preprocessed.check_preprocessed_dir`, logged on rank 0 only) and ``dataset_dir``
    is not read. Without it, rank 0 calls :func:`~monai_mae.data.ensure_dataset` (which writes the synthetic
    phantoms only with ``synthetic_if_missing``); the other ranks wait for it at the config's barrier.

    Args:
        dataset_dir: folder with ``datalist.json``.
        synthetic_if_missing: generate the synthetic dataset when ``datalist.json`` is absent. Defaults to False.
        preprocessed_dir: keyword-only. Folder written by ``python -m monai_mae.data.preprocess``; empty or
            ``None`` for NIfTI volumes. Defaults to ``""``.
        preset: keyword-only. The run's data preset, compared with the folder's. Defaults to None.
        cache: keyword-only. The run's ``cache`` setting, named as ignored in the folder's log line.
            Defaults to None.
        with_label: keyword-only. Every preprocessed volume must have a label (fine-tuning). Defaults to False.
        rank: keyword-only. This process's rank. Defaults to 0.

    Returns:
        The folder's manifest, the path of ``datalist.json`` (rank 0), or ``None`` (other ranks).

    Raises:
        ValueError: for a preprocessed folder that does not match the preset (see ``check_preprocessed_dir``).
        FileNotFoundError: for a missing ``manifest.json`` or ``datalist.json`` (see ``ensure_dataset``).
    """
    if preprocessed_dir and os.fspath(preprocessed_dir).strip():
        if preset is None:
            raise ValueError(f"preprocessed_dir={os.fspath(preprocessed_dir)!r} needs the run's preset to check it.")
        return check_preprocessed_dir(preprocessed_dir, preset, cache=cache, with_label=with_label, log=rank == 0)
    if rank == 0:
        return ensure_dataset(dataset_dir, synthetic_if_missing=synthetic_if_missing)
    return None


def start_process_group(device: str | torch.device, backend: str) -> int:
    """Select this process's GPU (CUDA devices) and join the process group once; return the rank.

    Args:
        device: the process's device, e.g. ``"cuda:1"`` (``LOCAL_RANK`` under ``torchrun``) or ``"cpu"``.
        backend: ``"nccl"`` or ``"gloo"``.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if on_cuda else None)
    return dist.get_rank()


def rank_zero_handlers(handlers: Sequence[Any], rank: int | None = None) -> list[Any]:
    """``handlers`` without the logging ones (stats, TensorBoard, learning rate, progress bar) on ranks other than 0.

    Args:
        handlers: the engine's handlers.
        rank: this process's rank. Defaults to None: ``torch.distributed``'s rank (0 without a process group).
    """
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    return [h for h in handlers if rank == 0 or not isinstance(h, LOGGING_HANDLERS)]


def window_inferer(
    roi_size: Sequence[int] | int, spatial_dims: int, sw_batch_size: int = 1, overlap: float = 0.0
) -> Inferer:
    """A sliding-window inferer over whole volumes: 3D windows for a 3D model, axial slices for a 2D one.

    Args:
        roi_size: the model's input size, (H, W) or (H, W, D).
        spatial_dims: 2 (``SliceInferer`` along the last axis) or 3 (``SlidingWindowInferer``).
        sw_batch_size: windows per forward pass. Defaults to 1.
        overlap: overlap of 3D windows. Defaults to 0.0.

    Raises:
        ValueError: for ``spatial_dims`` other than 2 or 3.
    """
    if spatial_dims == 2:
        return SliceInferer(roi_size=roi_size, spatial_dim=2, sw_batch_size=sw_batch_size)
    if spatial_dims == 3:
        return SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap)
    raise ValueError(f"spatial_dims={spatial_dims!r}: expected 2 or 3.")
