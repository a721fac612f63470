"""Read MAE encoder weights from wherever they are stored.

A checkpoint may be a ``.pt`` / ``.pth`` path, a state dict or a module; its weights may be nested
(bundle / Ignite / Lightning checkpoints: ``{"network": ..., "optimizer": ...}``), carry ``module.``
(DDP) or ``_orig_mod.`` (``torch.compile``) prefixes, and follow MONAI's ``MaskedAutoEncoderViT``
layout (final encoder norm at ``blocks.{L}.*``). This module turns all of them into one plain state
dict in ``MAEViT`` / MONAI ``ViT`` naming (``patch_embedding.*``, ``cls_token``, ``blocks.N.*``,
``norm.*``) and separates the encoder from the rest (decoder, ``mask_tokens``).
:mod:`monai_mae.networks.transfer` fits the result into a target network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

__all__ = [
    "BLOCK_KEY",
    "Checkpoint",
    "ENCODER_PREFIXES",
    "NEST_KEYS",
    "WRAPPER_PREFIXES",
    "extract_encoder_state_dict",
    "is_encoder_key",
    "read_checkpoint",
    "short_keys",
    "split_encoder",
    "strip_prefixes",
]

#: What :func:`read_checkpoint` accepts: a file path, a (possibly nested) state dict, or a module.
Checkpoint = Union[str, os.PathLike, Mapping[str, Any], nn.Module]

NEST_KEYS = ("network", "model", "state_dict", "net")  # where bundles / Ignite / Lightning nest weights
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
ENCODER_PREFIXES = ("patch_embedding.", "blocks.", "norm.")
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def short_keys(keys: Sequence[str], limit: int = 6) -> str:
    """``a, b, c (+N more)``: the first ``limit`` keys, for messages."""
    keys = list(keys)
    text = ", ".join(keys[:limit])
    return text + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def strip_prefixes(key: str) -> str:
    """Remove leading ``module.`` / ``_orig_mod.`` wrappers, in any order and number."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def is_encoder_key(key: str) -> bool:
    """Whether ``key`` (prefix-free) names an encoder tensor: ``cls_token``, ``patch_embedding.*``, ``blocks.*``, ``norm.*``."""
    return key == "cls_token" or key.startswith(ENCODER_PREFIXES)


def _find_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The first mapping, at this level or nested under :data:`NEST_KEYS`, that holds encoder tensors."""
    tensors = {strip_prefixes(k): v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if any(is_encoder_key(k) for k in tensors):
        return tensors
    for key in NEST_KEYS:
        value = obj.get(key)
        if isinstance(value, nn.Module):
            value = value.state_dict()
        if isinstance(value, Mapping):
            found = _find_state_dict(value)
            if found is not None:
                return found
    return None


def position_kind(checkpoint: Any) -> str | None:
    """The ``pos_embed_type`` of a module or of a self-describing model file (``{"monai_mae": {"network": ...}}``)."""
    if isinstance(checkpoint, nn.Module):
        return getattr(getattr(checkpoint, "patch_embedding", None), "pos_embed_type", None)
    if isinstance(checkpoint, Mapping):
        network = (checkpoint.get("monai_mae") or {}).get("network") if isinstance(checkpoint.get("monai_mae"), Mapping) else None
        return network.get("pos_embed_type") if isinstance(network, Mapping) else None
    return None


def read_checkpoint(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], tuple[int, ...] | None, str | None]:
    """Unwrapped, prefix-free state dict of ``checkpoint``, its patch grid when known (a module), and its
    position-embedding kind when known (a module or a self-describing model file)."""
    grid = None
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"MAE checkpoint file not found: '{path}'.")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle / zip errors come in many types
            raise ValueError(
                f"could not load the checkpoint '{path}' with torch.load(weights_only=True): {err}. "
                "Re-save it as tensors only, e.g. torch.save(net.state_dict(), path)."
            ) from err
        source = f"checkpoint file '{path}'"
    elif isinstance(checkpoint, nn.Module):
        grid = getattr(checkpoint, "grid_size", None)
        obj, source = checkpoint.state_dict(), f"{type(checkpoint).__name__} module"
    elif isinstance(checkpoint, Mapping):
        obj, source = checkpoint, "checkpoint"
    else:
        raise ValueError(
            f"checkpoint must be a path, a state dict or a module, got {type(checkpoint).__name__}."
        )
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} holds a {type(obj).__name__}, expected a state dict (a mapping of tensors).")
    kind = position_kind(checkpoint if isinstance(checkpoint, nn.Module) else obj)
    state = _find_state_dict(obj)
    if state is None:
        raise ValueError(
            f"no encoder weights (patch_embedding.*, blocks.*, norm.*) found in the {source}, nor under any of "
            f"{list(NEST_KEYS)}; its top-level keys are {short_keys([str(k) for k in obj])}."
        )
    return state, (tuple(int(g) for g in grid) if grid is not None else None), kind


def rename_monai_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI's ``MaskedAutoEncoderViT`` keeps the final encoder norm at ``blocks.{L}.*``: move it to ``norm.*``.

    The norm is recognised as the last block index whose entries are only ``weight`` / ``bias``.
    """
    subkeys: dict[int, set[str]] = {}
    for key in state:
        match = BLOCK_KEY.match(key)
        if match:
            subkeys.setdefault(int(match.group(1)), set()).add(match.group(2))
    if not subkeys or "norm.weight" in state:
        return state
    last = max(subkeys)
    if not subkeys[last] <= {"weight", "bias"}:
        return state
    old = f"blocks.{last}."
    return {("norm." + k[len(old) :] if k.startswith(old) else k): v for k, v in state.items()}


def split_encoder(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encoder tensors (MAEViT naming) and the names of everything else (decoder, stale keys)."""
    state = rename_monai_layout(state)
    encoder, others = {}, []
    for key, value in state.items():
        if is_encoder_key(key) and ".cross_attn." not in key:  # old MONAI saved unused cross-attention
            encoder[key] = value
        else:
            others.append(key)
    return encoder, others


def extract_encoder_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The encoder of an MAE checkpoint as a plain state dict in ``MAEViT`` / MONAI ``ViT`` naming.

    Unwraps bundle and Ignite checkpoints (weights nested under ``network``, ``model``,
    ``state_dict`` or ``net``, possibly beside an optimizer), strips ``module.`` / ``_orig_mod.``
    prefixes, renames MONAI ``MaskedAutoEncoderViT``'s final norm (``blocks.{L}.*``) to ``norm.*``
    and drops the decoder (``decoder_*``, ``mask_tokens``).

    Args:
        checkpoint: a ``.pt`` / ``.pth`` path (read with ``torch.load(map_location="cpu",
            weights_only=True)``), a state dict, or a module (its ``state_dict()``).

    Returns:
        ``{"patch_embedding.*", "cls_token", "blocks.N.*", "norm.*": tensor}`` (the tensors are not copied).

    Raises:
        FileNotFoundError: when the path does not exist.
        ValueError: when the file cannot be loaded with ``weights_only=True``, or no encoder
            weights are found (the message lists the top-level keys).

    Examples::

        >>> from monai_mae.networks.mae import MAEViT
        >>> net = MAEViT(1, 32, 16, hidden_size=24, mlp_dim=48, num_layers=2, num_heads=4,
        ...              decoder_hidden_size=12, decoder_num_layers=1, decoder_num_heads=4)
        >>> checkpoint = {"network": net.state_dict(), "optimizer": {}, "epoch": 3}  # as the bundle saves it
        >>> encoder = extract_encoder_state_dict(checkpoint)
        >>> sorted(encoder)[:2]
        ['blocks.0.attn.out_proj.bias', 'blocks.0.attn.out_proj.weight']
        >>> "mask_tokens" in encoder, any(key.startswith("decoder") for key in encoder)
        (False, False)

    From a file::

        encoder = extract_encoder_state_dict("runs/mae/model_final.pt")  # {"network": ..., "optimizer": ...}
    """
    state, _, _ = read_checkpoint(checkpoint)
    return split_encoder(state)[0]

