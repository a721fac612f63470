"""Small helpers shared across monai-mae: process rank, model unwrapping, durable file writes.

Import-light on purpose (the standard library and torch only, nothing from ``monai_mae``), so any
module can use it without an import cycle.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn as nn

__all__ = ["atomic_write", "is_distributed", "is_main_process", "unwrap"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """True on rank 0, and in a run without ``torch.distributed``."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def unwrap(network: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel``/``DataParallel`` or ``torch.compile`` wrapper."""
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], Any], mode: str = "wb") -> Path:
    """Write a file so that a crash or power loss leaves either the old file or the complete new one.

    ``write(handle)`` fills a temporary file ``.{name}.XXXX.tmp`` beside ``path``; the file is then
    flushed and ``fsync``-ed, renamed over ``path`` with ``os.replace`` and the folder is ``fsync``-ed so
    that the rename itself survives a power loss. On any error the temporary file is removed and the
    error propagates; ``path`` is untouched. The folder is created if needed and the file is made
    ``0o644`` (temporary files start as ``0o600``).

    Args:
        path: the destination.
        write: called once with the open temporary file, e.g. ``lambda f: torch.save(obj, f)``.
        mode: ``"wb"`` (default) or ``"w"`` (text, UTF-8).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: when ``mode`` is not ``"wb"`` or ``"w"``.
        TypeError: when ``write`` is not callable.

    Examples::

        >>> atomic_write("run/model.pt", lambda f: torch.save(state, f))
        >>> atomic_write("run/metrics.json", lambda f: json.dump(metrics, f), mode="w")
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}.")
    if not callable(write):
        raise TypeError(f"atomic_write: write must be callable, got {type(write).__name__}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path
