"""Small helpers shared across monai-mae, one per job: process rank, model unwrapping, finding a
network's ViT encoder, state-dict keys without wrapper prefixes, the weight-decay rule, reading JSON,
checking a positive number, durable file writes, telling whether ``torch.compile`` is tracing.

Import-light on purpose (the standard library and torch only, nothing from ``monai_mae``), so any
module can use it without an import cycle.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn as nn

__all__ = [
    "NO_WEIGHT_DECAY_NAMES",
    "atomic_write",
    "find_vit",
    "vit_of",
    "is_compiling",
    "is_distributed",
    "is_main_process",
    "is_positive_finite",
    "is_vit",
    "no_weight_decay",
    "read_json",
    "strip_prefixes",
    "unwrap",
]

#: Parameter-name fragments that get no weight decay: class / mask tokens and position tables.
NO_WEIGHT_DECAY_NAMES = ("cls_token", "mask_tokens", "position_embeddings", "pos_embedding")


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


#: State-dict key prefixes added by ``DistributedDataParallel`` and ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(key: str) -> str:
    """``key`` without leading ``module.`` / ``_orig_mod.`` wrappers, in any order and number."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def is_vit(module: Any) -> bool:
    """Duck-typed ViT encoder (MONAI ``ViT``, :class:`~monai_mae.networks.vitseg.ViTSeg`, ``MAEViT``).

    A ViT has a ``patch_embedding`` module with ``patch_embeddings`` (the projection) and a
    ``position_embeddings`` tensor, ``blocks`` as an ``nn.ModuleList`` and a final ``norm`` module.
    """
    patch = getattr(module, "patch_embedding", None)
    return (
        isinstance(module, nn.Module)
        and isinstance(getattr(module, "blocks", None), nn.ModuleList)
        and isinstance(getattr(module, "norm", None), nn.Module)
        and isinstance(patch, nn.Module)
        and hasattr(patch, "patch_embeddings")
        and isinstance(getattr(patch, "position_embeddings", None), torch.Tensor)
    )


def vit_of(network: Any) -> nn.Module | None:
    """The ViT encoder of ``network`` (itself or its ``.vit``, after unwrapping DDP / ``torch.compile``), or None."""
    if not isinstance(network, nn.Module):
        return None
    inner = unwrap(network)
    return next((c for c in (inner, getattr(inner, "vit", None)) if is_vit(c)), None)


def find_vit(network: Any, caller: str = "find_vit") -> tuple[nn.Module, str]:
    """The ViT encoder of ``network`` and the prefix of its keys in ``network.state_dict()``.

    The encoder is ``network`` itself (MONAI ``ViT``, ``ViTSeg``) or its ``.vit`` (MONAI ``UNETR``),
    after unwrapping ``DistributedDataParallel`` / ``torch.compile``; recognised by :func:`is_vit`.

    Args:
        network: the network to search.
        caller: the function named in the error message.

    Returns:
        ``(vit, prefix)``, e.g. ``(unetr.vit, "vit.")``; the prefix is ``""`` for a bare ViT.

    Raises:
        ValueError: when ``network`` holds no ViT (the message names its type and what a ViT has).

    Examples::

        >>> from monai.networks.nets import UNETR
        >>> unetr = UNETR(1, 2, 32, feature_size=4, hidden_size=24, mlp_dim=24, num_heads=2)
        >>> vit, prefix = find_vit(unetr)
        >>> vit is unetr.vit, prefix
        (True, 'vit.')
    """
    candidate = vit_of(network)
    if candidate is not None:
        name = next(name for name, module in network.named_modules() if module is candidate)
        return candidate, f"{name}." if name else ""
    raise ValueError(
        f"{caller} expects a MONAI UNETR, a MONAI ViT, a ViTSeg or a module holding a ViT at `.vit` (a ViT has "
        "`patch_embedding` with `patch_embeddings` and a `position_embeddings` tensor, `blocks` as an nn.ModuleList "
        f"and a final `norm`), got {type(network).__name__}."
    )


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW should leave ``param`` undecayed: 1-D tensors (biases, norm and LayerScale weights) and,
    by name (:data:`NO_WEIGHT_DECAY_NAMES`), class / mask tokens and position tables.

    Args:
        name: the parameter's name in ``named_parameters()``.
        param: the parameter.

    Examples::

        >>> no_weight_decay("blocks.0.norm1.weight", torch.ones(8)), no_weight_decay("cls_token", torch.zeros(1, 1, 8))
        (True, True)
        >>> no_weight_decay("blocks.0.mlp.linear1.weight", torch.zeros(16, 8))
        False
    """
    return param.ndim <= 1 or any(key in name for key in NO_WEIGHT_DECAY_NAMES)


def read_json(path: str | os.PathLike | Any, name: str | None = None) -> Any:
    """Parse a UTF-8 JSON file, naming the file, line and column of a syntax error.

    Args:
        path: a file path, or a traversable with ``read_text`` (e.g. from ``importlib.resources``).
        name: how to call the file in messages; defaults to ``str(path)``.

    Raises:
        TypeError: when ``path`` is neither a path nor readable.
        FileNotFoundError: when the file does not exist.
        ValueError: for malformed JSON (``"{name}: malformed JSON at line L, column C: ..."``) or text
            that is not UTF-8.

    Examples::

        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "broken.json"
        ...     _ = path.write_text('{"a": 1,\\n}')
        ...     read_json(path)
        Traceback (most recent call last):
            ...
        ValueError: ...broken.json: malformed JSON at line 2, column 1: Expecting property name enclosed in double quotes.
    """
    if isinstance(path, (str, os.PathLike)):
        source: Any = Path(path)
    elif callable(getattr(path, "read_text", None)):
        source = path
    else:
        raise TypeError(f"read_json: path must be a path or have read_text(), got {type(path).__name__}.")
    label = str(path) if name is None else name
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{label}: not a UTF-8 text JSON file ({err}).") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{label}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from err


def is_positive_finite(value: Any) -> bool:
    """True for an int or float (not a bool) that is finite and > 0.

    Examples::

        >>> [is_positive_finite(v) for v in (2, 0.5, 0, -1.0, float("inf"), True, "2")]
        [True, True, False, False, False, False, False]
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# torch >= 2.3; earlier releases have no public query and are treated as never tracing
_torch_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def is_compiling() -> bool:
    """Whether ``torch.compile`` (dynamo) is tracing the caller: code that reads tensor values to the host
    (``bool(t)``, ``t.item()``) would break the graph there. False on torch < 2.3."""
    return bool(_torch_is_compiling()) if _torch_is_compiling is not None else False


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

        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = atomic_write(Path(folder) / "run" / "metrics.json", lambda f: json.dump({"loss": 0.5}, f), mode="w")
        ...     path.name, read_json(path), [p.name for p in path.parent.iterdir()]  # no temporary file left
        ('metrics.json', {'loss': 0.5}, ['metrics.json'])

    A checkpoint::

        atomic_write("run/model.pt", lambda f: torch.save(state, f))
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
