"""One adapter per checkpoint layout that monai-mae reads, in one place.

Every layout is a :class:`CheckpointAdapter` with two steps, each a no-op for other layouts:

* :meth:`~CheckpointAdapter.unpack` finds the weights inside the layout's container (and the
  description a model file carries);
* :meth:`~CheckpointAdapter.rename` turns the layout's key names into ``MAEViT`` / MONAI ``ViT`` naming
  (``patch_embedding.*``, ``cls_token``, ``blocks.N.*``, ``norm.*``).

:data:`ADAPTERS` lists them in the order :func:`monai_mae.networks.checkpoint_io.read_checkpoint` tries
them: the first container that recognises the object unpacks it, then every ``rename`` runs on the
prefix-free tensors. The layouts:

* :class:`ModelFileAdapter`: monai-mae model files, ``{"network": state_dict, "monai_mae": description}``
  (:mod:`monai_mae.model_file` writes them);
* :class:`NestedCheckpointAdapter`: bundle / Ignite / Lightning checkpoints, the weights nested under
  ``network``, ``model``, ``state_dict`` or ``net``, possibly beside an optimizer;
* :class:`MonaiMAEAdapter`: MONAI's ``MaskedAutoEncoderViT``, which keeps its final norms inside the
  block lists (``blocks.{L}.*``); :class:`~monai_mae.networks.mae.MAEViT`'s load pre-hook uses the same
  renaming (:func:`monai_mae_renames`).

* :class:`NnsslAdapter`: nnssl checkpoints (``network_weights`` + ``nnssl_adaptation_plan``) of Primus / EvaMAE
  encoders. Their mapping needs the plan (heads, token order, axes), so ``unpack`` does all of it
  (:func:`monai_mae.networks.nnssl.nnssl_model_file`) and returns the weights in ``MAEViT`` naming with a model
  file's description; for a file whose token order or heads cannot be told, read it with
  :func:`monai_mae.networks.checkpoint_io.read_nnssl_checkpoint` and pass what that returns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from monai_mae.networks.nnssl import is_nnssl_checkpoint, nnssl_model_file
from monai_mae.utils import WRAPPER_PREFIXES, strip_prefixes

__all__ = [
    "ADAPTERS",
    "BLOCK_KEY",
    "CheckpointAdapter",
    "DESCRIPTION_KEY",
    "ENCODER_PREFIXES",
    "ModelFileAdapter",
    "MonaiMAEAdapter",
    "NEST_KEYS",
    "NestedCheckpointAdapter",
    "NnsslAdapter",
    "WEIGHTS_KEY",
    "WRAPPER_PREFIXES",
    "is_encoder_key",
    "monai_mae_renames",
    "strip_prefixes",
    "tensors_of",
]

DESCRIPTION_KEY = "monai_mae"  # a model file's description
WEIGHTS_KEY = "network"  # a model file's (and the bundles' checkpoints') weights
NEST_KEYS = ("network", "model", "state_dict", "net")  # where bundles / Ignite / Lightning nest weights
ENCODER_PREFIXES = ("patch_embedding.", "blocks.", "norm.")
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

Unpacked = tuple[Mapping[str, Any], Mapping[str, Any] | None]


def is_encoder_key(key: str) -> bool:
    """Whether ``key`` (prefix-free) names an encoder tensor: ``cls_token``, ``patch_embedding.*``, ``blocks.*``,
    ``norm.*``."""
    return key == "cls_token" or key.startswith(ENCODER_PREFIXES)


def tensors_of(obj: Mapping[str, Any] | nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a mapping (or a module's ``state_dict()``), wrapper prefixes stripped."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    return {strip_prefixes(k): v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


class CheckpointAdapter:
    """One checkpoint layout: where its weights are, and how its keys map to ``MAEViT`` naming.

    Subclasses override one or both steps; the defaults do nothing.
    """

    #: Short name, for messages and tests.
    name = "layout"

    def unpack(self, obj: Mapping[str, Any]) -> Unpacked | None:
        """``(weights, description)`` when ``obj`` is this layout's container, else None.

        Args:
            obj: what ``torch.load`` returned (or the mapping given).

        Returns:
            The mapping that holds the weights (a module is also accepted) and the layout's own
            description of them (a model file's ``monai_mae`` entry), or None.
        """
        return None

    def rename(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (prefix-free tensors) with this layout's keys in ``MAEViT`` naming; the same object when
        ``state`` is not of this layout."""
        return state


class ModelFileAdapter(CheckpointAdapter):
    """monai-mae model files: ``{"network": state_dict, "monai_mae": {"network": ..., "data_preset": ...}}``."""

    name = "model file"

    def unpack(self, obj: Mapping[str, Any]) -> Unpacked | None:
        description = obj.get(DESCRIPTION_KEY)
        if not isinstance(description, Mapping):
            return None
        return obj.get(WEIGHTS_KEY, obj), description


class NestedCheckpointAdapter(CheckpointAdapter):
    """Bundle / Ignite / Lightning checkpoints: the first mapping under :data:`NEST_KEYS` (at any depth) that
    holds encoder tensors, e.g. ``{"network": state_dict, "optimizer": ..., "epoch": 3}``."""

    name = "bundle/Ignite checkpoint"

    def unpack(self, obj: Mapping[str, Any]) -> Unpacked | None:
        if any(is_encoder_key(k) for k in tensors_of(obj)):
            return None  # the weights are at the top: nothing nested
        found = self._find(obj)
        return (found, None) if found is not None else None

    def _find(self, obj: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        tensors = tensors_of(obj)
        if any(is_encoder_key(k) for k in tensors):
            return tensors
        for key in NEST_KEYS:
            value = obj.get(key)
            if isinstance(value, nn.Module):
                value = value.state_dict()
            if isinstance(value, Mapping):
                found = self._find(value)
                if found is not None:
                    return found
        return None


class NnsslAdapter(CheckpointAdapter):
    """nnssl checkpoints: ``{"network_weights": ..., "nnssl_adaptation_plan": ..., "trainer_name": ...}`` of Primus /
    EvaMAE encoders, mapped to ``MAEViT`` naming with a model file's description (network, data preset).

    Raises (from ``unpack``):
        ValueError: for a CNN (ResEnc) checkpoint, or a file whose token order or heads cannot be told.
    """

    name = "nnssl checkpoint"

    def unpack(self, obj: Mapping[str, Any]) -> Unpacked | None:
        if not is_nnssl_checkpoint(obj):
            return None
        converted = nnssl_model_file(obj)
        return converted[WEIGHTS_KEY], converted[DESCRIPTION_KEY]


def monai_mae_renames(
    keys: Iterable[str], prefix: str = "", depths: Mapping[str, int | None] | None = None
) -> dict[str, str | None]:
    """Key renames from MONAI's ``MaskedAutoEncoderViT`` layout to ``MAEViT``'s.

    MONAI keeps each final norm as one more entry of its block list (``blocks.{L}.*`` for the encoder's
    ``norm``, ``decoder_blocks.{L}.*`` for ``decoder_norm``); older MONAI versions also saved unused
    ``cross_attn`` weights in the blocks.

    Args:
        keys: the state dict's keys.
        prefix: the module's prefix in the state dict (``load_state_dict`` pre-hooks get one).
        depths: block list name -> its number of blocks, or None to recognise the norm as the last index
            whose entries are only ``weight`` / ``bias`` (then only when the norm's own keys are absent).
            Defaults to ``{"blocks": None}`` (the encoder).

    Returns:
        ``{old key: new key}``, and ``{old key: None}`` for stale cross-attention weights.

    Examples::

        >>> monai_mae_renames(["blocks.0.mlp.linear1.weight", "blocks.1.weight", "blocks.1.bias"])
        {'blocks.1.weight': 'norm.weight', 'blocks.1.bias': 'norm.bias'}
    """
    keys = list(keys)
    renames: dict[str, str | None] = {}
    for blocks, depth in (depths if depths is not None else {"blocks": None}).items():
        norm = f"{prefix}{blocks.replace('blocks', 'norm')}."
        pattern = re.compile(rf"^{re.escape(prefix + blocks)}\.(\d+)\.(.+)$")
        entries: dict[int, dict[str, str]] = {}
        for key in keys:
            match = pattern.match(key)
            if match:
                entries.setdefault(int(match.group(1)), {})[key] = match.group(2)
        for index in entries:
            renames.update({key: None for key, sub in entries[index].items() if ".cross_attn." in f".{sub}"})
        if depth is None:
            if not entries or any(k.startswith(norm) for k in keys):
                continue
            depth = max(entries)
            if not set(entries[depth].values()) <= {"weight", "bias"}:
                continue
        renames.update({key: norm + sub for key, sub in entries.get(depth, {}).items()})
    return renames


class MonaiMAEAdapter(CheckpointAdapter):
    """MONAI's ``MaskedAutoEncoderViT``: the final encoder norm at ``blocks.{L}.*`` moves to ``norm.*``.

    Stale ``cross_attn`` weights of older MONAI versions keep their names (they are no encoder tensors).
    """

    name = "MONAI MaskedAutoEncoderViT"

    def rename(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        renames = {old: new for old, new in monai_mae_renames(state).items() if new is not None}
        if not renames:
            return state
        return {renames.get(k, k): v for k, v in state.items()}


#: The layouts :func:`~monai_mae.networks.checkpoint_io.read_checkpoint` reads, in the order tried.
ADAPTERS: tuple[CheckpointAdapter, ...] = (
    ModelFileAdapter(),
    NnsslAdapter(),
    NestedCheckpointAdapter(),
    MonaiMAEAdapter(),
)
