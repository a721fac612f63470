"""Read checkpoints: the one loader of checkpoint files, and MAE encoder weights from any layout.

:func:`load_checkpoint_file` is the one ``torch.load`` of weight files in the package (MAE checkpoints here,
model files in :func:`monai_mae.model_file.read_model` and the exporter; resuming a run reads its trainer
state in :mod:`monai_mae.engines.checkpoint`). :func:`read_checkpoint` takes a path, a (possibly nested) state
dict or a module, lets the adapters of :mod:`monai_mae.networks.checkpoint_adapters` find the weights
(model files, nnssl checkpoints, bundle / Ignite / Lightning checkpoints) and rename them (MONAI's
``MaskedAutoEncoderViT``), strips ``module.`` (DDP) / ``_orig_mod.`` (``torch.compile``) prefixes, and returns one
plain state dict in ``MAEViT`` / MONAI ``ViT`` naming (``patch_embedding.*``, ``cls_token``, ``blocks.N.*``,
``norm.*``);
:func:`split_encoder` separates the encoder from the rest (decoder, ``mask_tokens``).
:mod:`monai_mae.networks.transfer` fits the result into a target network. :func:`read_nnssl_checkpoint` reads an
nnssl checkpoint as a monai-mae model file, with the choices a file may leave open (token order, heads).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch
import torch.nn as nn

from monai_mae.networks.checkpoint_adapters import (
    ADAPTERS,
    ENCODER_PREFIXES,
    NEST_KEYS,
    is_encoder_key,
    tensors_of,
)
from monai_mae.networks.nnssl import nnssl_model_file

__all__ = [
    "Checkpoint",
    "EncoderCheckpoint",
    "extract_encoder_state_dict",
    "load_checkpoint_file",
    "read_checkpoint",
    "read_nnssl_checkpoint",
    "short_keys",
    "split_encoder",
]

#: What :func:`read_checkpoint` accepts: a file path, a (possibly nested) state dict, or a module.
Checkpoint = Union[str, os.PathLike, Mapping[str, Any], nn.Module]


class EncoderCheckpoint(NamedTuple):
    """What :func:`read_checkpoint` found.

    Attributes:
        state: prefix-free tensors in ``MAEViT`` naming (encoder and the rest).
        grid: the patch grid, when known (a module's ``grid_size``).
        pos_embed_type: the position-embedding kind, when known (a module, or a model file's description).
        layouts: the names of the adapters that unpacked or renamed the checkpoint, in order.
    """

    state: dict[str, torch.Tensor]
    grid: tuple[int, ...] | None
    pos_embed_type: str | None
    layouts: tuple[str, ...]


def short_keys(keys: Sequence[str], limit: int = 6) -> str:
    """``a, b, c (+N more)``: the first ``limit`` keys, for messages."""
    keys = list(keys)
    text = ", ".join(keys[:limit])
    return text + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_checkpoint_file(
    path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False, advice: str = ""
) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with errors that name the file.

    Args:
        path: an existing file (callers check existence with their own message).
        what: how messages call the file (``"checkpoint"``, ``"model file"``).
        mmap: map the tensors instead of reading them (``torch.load(mmap=True)``); a file in torch's legacy
            (non-zip) format cannot be mapped and is read as usual. Defaults to False.
        advice: a sentence appended to the error message.

    Raises:
        ValueError: when ``torch.load`` fails (not a checkpoint, or objects other than tensors and containers).
    """
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy format: no mmap
                pass
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors come in many types
        message = f"could not load the {what} '{path}' with torch.load(weights_only=True): {err}.{advice}"
        raise ValueError(message) from err


def read_checkpoint(checkpoint: Checkpoint) -> EncoderCheckpoint:
    """Unwrapped, prefix-free state dict of ``checkpoint`` in ``MAEViT`` naming, whatever its layout.

    Args:
        checkpoint: a ``.pt`` / ``.pth`` path (:func:`load_checkpoint_file`), a state dict (possibly nested as
            a model file or a bundle / Ignite / Lightning checkpoint), or a module (its ``state_dict()``).

    Raises:
        FileNotFoundError: when the path does not exist.
        ValueError: for an unreadable file, an object that is no mapping, or no encoder weights anywhere
            (the message lists the top-level keys).
    """
    grid = kind = None
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"MAE checkpoint file not found: '{path}'.")
        advice = " Re-save it as tensors only, e.g. torch.save(net.state_dict(), path)."
        obj, source = load_checkpoint_file(path, advice=advice), f"checkpoint file '{path}'"
    elif isinstance(checkpoint, nn.Module):
        grid = getattr(checkpoint, "grid_size", None)
        kind = getattr(getattr(checkpoint, "patch_embedding", None), "pos_embed_type", None)
        obj, source = checkpoint.state_dict(), f"{type(checkpoint).__name__} module"
    elif isinstance(checkpoint, Mapping):
        obj, source = checkpoint, "checkpoint"
    else:
        raise ValueError(f"checkpoint must be a path, a state dict or a module, got {type(checkpoint).__name__}.")
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} holds a {type(obj).__name__}, expected a state dict (a mapping of tensors).")
    weights, layouts = obj, []
    for adapter in ADAPTERS:
        try:
            unpacked = adapter.unpack(obj)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err
        if unpacked is not None:
            (weights, description), layouts = unpacked, [adapter.name]
            network = description.get("network") if isinstance(description, Mapping) else None
            kind = network.get("pos_embed_type") if isinstance(network, Mapping) else kind
            if isinstance(network, Mapping) and adapter.name == "nnssl checkpoint":  # the pretraining grid
                grid = [i // p for i, p in zip(network["img_size"], network["patch_size"])]
            break
    state = tensors_of(weights) if isinstance(weights, (Mapping, nn.Module)) else {}
    for adapter in ADAPTERS:
        renamed = adapter.rename(state)
        layouts += [adapter.name] if renamed is not state else []
        state = renamed
    if not any(is_encoder_key(k) for k in state):
        raise ValueError(
            f"no encoder weights ({', '.join(p + '*' for p in ENCODER_PREFIXES)}) found in the {source}, nor under "
            f"any of {list(NEST_KEYS)}; its top-level keys are {short_keys([str(k) for k in obj])}."
        )
    return EncoderCheckpoint(state, tuple(int(g) for g in grid) if grid is not None else None, kind, tuple(layouts))


def read_nnssl_checkpoint(
    path: str | os.PathLike,
    token_order: str | None = None,
    num_heads: int | None = None,
    axes: Sequence[int] | None = None,
    configuration: str | None = None,
) -> dict[str, Any]:
    """An nnssl ``checkpoint_final.pth`` (Primus / EvaMAE encoder) as a monai-mae model file.

    What it returns is ``{"network": state_dict, "monai_mae": description}``: pass it to
    :func:`~monai_mae.networks.transfer.load_mae_encoder` or :func:`~monai_mae.model_file.read_model`, or
    ``torch.save`` it as a model file. A path alone does the same where the file tells everything
    (:func:`~monai_mae.networks.nnssl.nnssl_model_file`).

    Args:
        path: the nnssl checkpoint.
        token_order: ``"whd"`` (Primus, nnssl's SimMIM) or ``"hwd"`` (nnssl's EvaMAE); None: read from the file.
        num_heads: attention heads; None: from the architecture name (``PrimusS/B/M/L``).
        axes: nnssl array axis of each of our (RAS) axes; None: from the plan's ``transpose_forward``.
        configuration: the pretraining plan's named configuration, where it has several.

    Raises:
        FileNotFoundError: when the path does not exist.
        ValueError: for a file that is no nnssl checkpoint of a Primus / EvaMAE encoder, or choices it leaves open.

    Examples::

        model = read_nnssl_checkpoint("checkpoint_final.pth")  # an OpenMind Primus-M (EvaMAE) checkpoint
        torch.save(model, "primus_m.pt")  # a model file: monai-mae finetune --pretrained primus_m.pt ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"nnssl checkpoint not found: '{path}'.")
    advice = (
        " If you trust the file, load it with torch.load(path, weights_only=False) and pass the dict to "
        "monai_mae.networks.nnssl.nnssl_model_file."
    )
    obj = load_checkpoint_file(path, "nnssl checkpoint", advice=advice)
    if not isinstance(obj, Mapping):
        raise ValueError(f"the nnssl checkpoint '{path}' holds a {type(obj).__name__}, expected a dict.")
    return nnssl_model_file(obj, token_order, num_heads, axes, configuration, source=f"the nnssl checkpoint '{path}'")


def split_encoder(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encoder tensors (MAEViT naming) and the names of everything else (decoder, stale keys)."""
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
    return split_encoder(read_checkpoint(checkpoint).state)[0]
