"""Load a pretrained MAE encoder into MONAI's ``UNETR`` or ``ViT`` for fine-tuning.

The encoder of :class:`~monai_mae.networks.mae.MAEViT` is named as in MONAI's ``ViT``
(``patch_embedding.*``, ``cls_token``, ``blocks.N.*``, ``norm.*``), so most tensors copy across
unchanged. This module adds what a plain ``load_state_dict`` does not do:

* unwrap bundle / Ignite checkpoints (``{"network": ..., "optimizer": ...}``) and strip the
  ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes;
* accept MONAI's ``MaskedAutoEncoderViT`` layout (final encoder norm at ``blocks.{L}.*``);
* drop the decoder (``decoder_*``, ``mask_tokens``) and a ``cls_token`` the target has no use for;
* interpolate the position table when the target is built for another patch grid;
* convert the patch projection between ``conv`` and ``perceptron`` (same function, other layout);
* check the whole fit (width, depth, patch size, channels, every shape) before writing anything;

and, for after the transfer, :func:`rescale_residual_stream` / :func:`match_residual_stream`: scale
a pre-norm ViT's residual stream by a constant without changing what the encoder computes (see there).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn
from einops import rearrange

from monai_mae.networks.pos_embed import interpolate_pos_embed, sincos_pos_embed

__all__ = [
    "TransferReport",
    "load_mae_encoder",
    "extract_encoder_state_dict",
    "residual_stream_norm",
    "rescale_residual_stream",
    "match_residual_stream",
]

logger = logging.getLogger(__name__)

Checkpoint = Union[str, os.PathLike, Mapping[str, Any], nn.Module]

NEST_KEYS = ("network", "model", "state_dict", "net")  # where bundles / Ignite / Lightning nest weights
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
ENCODER_PREFIXES = ("patch_embedding.", "blocks.", "norm.")
POS_KEY = "patch_embedding.position_embeddings"
CONV_WEIGHT, CONV_BIAS = "patch_embedding.patch_embeddings.weight", "patch_embedding.patch_embeddings.bias"
LINEAR_WEIGHT, LINEAR_BIAS = "patch_embedding.patch_embeddings.1.weight", "patch_embedding.patch_embeddings.1.bias"
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_UNUSED_NORM = ".norm_cross_attn."
_GRID_AXES = ("p1", "p2", "p3")


@dataclass
class TransferReport:
    """What :func:`load_mae_encoder` did.

    Key lists name target keys as in ``network.state_dict()`` (``vit.blocks.0...`` for ``UNETR``),
    except ``ignored``, which names checkpoint keys (after unwrapping and prefix stripping).

    Attributes:
        loaded: target keys written from the checkpoint (including interpolated and converted ones).
        interpolated: target keys whose value was resampled to the target's patch grid.
        converted: target keys whose value changed layout or kind on the way (conv <-> perceptron
            projection; a sin-cos table copied into a learnable one, or the other way round).
        ignored: checkpoint keys not used (decoder, ``mask_tokens``, an unneeded ``cls_token``, ...).
        missing: target encoder keys the checkpoint has no value for (left as they were).
        skipped: target keys left as they were because the checkpoint's tensor does not fit
            (``strict=False`` only; the reasons are in ``notes``).
        notes: human-readable remarks (position-table handling, skip reasons).
    """

    loaded: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"MAE encoder transfer: {len(self.loaded)} tensors loaded ({len(self.interpolated)} interpolated, "
            f"{len(self.converted)} converted), {len(self.ignored)} checkpoint keys ignored, "
            f"{len(self.missing)} missing, {len(self.skipped)} skipped."
        ]
        for name in ("interpolated", "converted", "missing", "skipped"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"  {name}: {_short(keys)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- reading
def _short(keys: Sequence[str], limit: int = 6) -> str:
    """``a, b, c (+N more)`` for messages."""
    keys = list(keys)
    text = ", ".join(keys[:limit])
    return text + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _strip_prefixes(key: str) -> str:
    """Remove leading ``module.`` / ``_orig_mod.`` wrappers, in any order and number."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _is_encoder_key(key: str) -> bool:
    return key == "cls_token" or key.startswith(ENCODER_PREFIXES)


def _find_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The first mapping, at this level or nested under :data:`NEST_KEYS`, that holds encoder tensors."""
    tensors = {_strip_prefixes(k): v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if any(_is_encoder_key(k) for k in tensors):
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


def _position_kind(checkpoint: Any) -> str | None:
    """The ``pos_embed_type`` of a module or of a self-describing model file (``{"monai_mae": {"network": ...}}``)."""
    if isinstance(checkpoint, nn.Module):
        return getattr(getattr(checkpoint, "patch_embedding", None), "pos_embed_type", None)
    if isinstance(checkpoint, Mapping):
        network = (checkpoint.get("monai_mae") or {}).get("network") if isinstance(checkpoint.get("monai_mae"), Mapping) else None
        return network.get("pos_embed_type") if isinstance(network, Mapping) else None
    return None


def _read_checkpoint(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], tuple[int, ...] | None, str | None]:
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
    kind = _position_kind(checkpoint if isinstance(checkpoint, nn.Module) else obj)
    state = _find_state_dict(obj)
    if state is None:
        raise ValueError(
            f"no encoder weights (patch_embedding.*, blocks.*, norm.*) found in the {source}, nor under any of "
            f"{list(NEST_KEYS)}; its top-level keys are {_short([str(k) for k in obj])}."
        )
    return state, (tuple(int(g) for g in grid) if grid is not None else None), kind


def _rename_monai_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI's ``MaskedAutoEncoderViT`` keeps the final encoder norm at ``blocks.{L}.*``: move it to ``norm.*``.

    The norm is recognised as the last block index whose entries are only ``weight`` / ``bias``.
    """
    subkeys: dict[int, set[str]] = {}
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            subkeys.setdefault(int(match.group(1)), set()).add(match.group(2))
    if not subkeys or "norm.weight" in state:
        return state
    last = max(subkeys)
    if not subkeys[last] <= {"weight", "bias"}:
        return state
    old = f"blocks.{last}."
    return {("norm." + k[len(old) :] if k.startswith(old) else k): v for k, v in state.items()}


def _split_encoder(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encoder tensors (MAEViT naming) and the names of everything else (decoder, stale keys)."""
    state = _rename_monai_layout(state)
    encoder, others = {}, []
    for key, value in state.items():
        if _is_encoder_key(key) and ".cross_attn." not in key:  # old MONAI saved unused cross-attention
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

        >>> net = MAEViT(1, (96, 96, 96), 16)
        >>> encoder = extract_encoder_state_dict(net.state_dict())
        >>> sorted(encoder)[:2]
        ['blocks.0.attn.out_proj.bias', 'blocks.0.attn.out_proj.weight']
        >>> encoder = extract_encoder_state_dict("runs/mae/model_final.pt")  # {"network": ..., "optimizer": ...}
    """
    state, _, _ = _read_checkpoint(checkpoint)
    return _split_encoder(state)[0]


# ---------------------------------------------------------------------------------------- target
def _is_vit(module: Any) -> bool:
    """Duck-typed MONAI ``ViT``: ``patch_embedding`` with a projection and a position table, ``blocks``, ``norm``."""
    patch = getattr(module, "patch_embedding", None)
    return (
        isinstance(module, nn.Module)
        and isinstance(getattr(module, "blocks", None), nn.ModuleList)
        and isinstance(getattr(module, "norm", None), nn.Module)
        and isinstance(patch, nn.Module)
        and hasattr(patch, "patch_embeddings")
        and isinstance(getattr(patch, "position_embeddings", None), torch.Tensor)
    )


def _find_vit(network: Any) -> tuple[nn.Module, str]:
    """The ViT to load into and the prefix of its keys in ``network.state_dict()``."""
    if _is_vit(network):
        return network, ""
    if isinstance(network, nn.Module) and _is_vit(getattr(network, "vit", None)):
        return network.vit, "vit."
    raise ValueError(
        f"load_mae_encoder expects a MONAI UNETR, a MONAI ViT or a module holding a ViT at `.vit`, "
        f"got {type(network).__name__}."
    )


def _target_patch_size(vit: nn.Module, network: nn.Module) -> tuple[int, ...] | None:
    """Patch size of a perceptron target: from its einops ``Rearrange`` or the network's ``patch_size``."""
    for module in vit.patch_embedding.patch_embeddings.modules():
        lengths = getattr(module, "axes_lengths", None)
        if isinstance(lengths, Mapping) and lengths and all(a in lengths for a in _GRID_AXES[: len(lengths)]):
            return tuple(int(lengths[a]) for a in _GRID_AXES[: len(lengths)])
    size = getattr(network, "patch_size", None)
    return tuple(int(p) for p in size) if isinstance(size, Sequence) else None


def _target_grid(vit: nn.Module, network: nn.Module) -> tuple[int, ...] | None:
    for owner, name in ((network, "feat_size"), (vit.patch_embedding, "grid_size")):
        grid = getattr(owner, name, None)
        if isinstance(grid, Sequence) and grid:
            return tuple(int(g) for g in grid)
    return None


def _factorizations(n: int, dims: int) -> list[tuple[int, ...]]:
    """Every ordered ``(g1, ..., g_dims)`` with product ``n``."""
    if dims == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in _factorizations(n // d, dims - 1)]


def _sincos_grid(table: torch.Tensor, dims: int | None) -> tuple[int, ...] | None:
    """The patch grid whose sin-cos table ``table`` (1, N, D) is, or None when it is not one."""
    n_tokens, width = table.shape[1], table.shape[-1]
    if not dims or width < 2 * dims:
        return None
    values = table.detach().float()
    for grid in _factorizations(n_tokens, dims):
        if torch.allclose(values, sincos_pos_embed(grid, width, device=table.device), atol=1e-5):
            return grid
    return None


def _cubic_grid(n_tokens: int, dims: int | None) -> tuple[int, ...] | None:
    """``(g,) * dims`` when ``n_tokens == g ** dims``."""
    if not dims:
        return None
    side = round(n_tokens ** (1.0 / dims))
    for g in (side - 1, side, side + 1):
        if g > 0 and g**dims == n_tokens:
            return (g,) * dims
    return None


@dataclass
class _Projection:
    """What the patch projection tells about the input geometry."""

    kind: str  # "conv" or "perceptron"
    in_features: int  # prod(P) * C
    patch_size: tuple[int, ...] | None = None
    in_channels: int | None = None


def _projection(state: Mapping[str, torch.Tensor], patch_size: tuple[int, ...] | None = None) -> _Projection | None:
    """Kind and input geometry of the patch projection in ``state`` (``patch_size`` for a perceptron)."""
    if CONV_WEIGHT in state and state[CONV_WEIGHT].ndim >= 3:
        weight = state[CONV_WEIGHT]  # (D, C, *P)
        return _Projection("conv", math.prod(weight.shape[1:]), tuple(weight.shape[2:]), int(weight.shape[1]))
    if LINEAR_WEIGHT in state:
        width = int(state[LINEAR_WEIGHT].shape[1])  # (D, prod(P) * C)
        channels = None
        if patch_size is not None and width % math.prod(patch_size) == 0:
            channels = width // math.prod(patch_size)
        return _Projection("perceptron", width, patch_size, channels)
    return None


def _hidden_width(state: Mapping[str, torch.Tensor]) -> int | None:
    for key in ("norm.weight", "blocks.0.norm1.weight", CONV_WEIGHT, LINEAR_WEIGHT, POS_KEY):
        if key in state:
            return int(state[key].shape[-1] if key == POS_KEY else state[key].shape[0])
    return None


def _depth(state: Mapping[str, torch.Tensor]) -> int:
    return len({int(m.group(1)) for m in map(_BLOCK_KEY.match, state) if m})


def _conv_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """``(D, C, *P) -> (D, prod(P) * C)``: ``o c p1 p2 p3 -> o (p1 p2 p3 c)`` (token layout, channel last)."""
    return rearrange(weight, "o c ... -> o (... c)")


def _linear_to_conv(weight: torch.Tensor, patch_size: Sequence[int], in_channels: int) -> torch.Tensor:
    """``(D, prod(P) * C) -> (D, C, *P)``: ``o (p1 p2 p3 c) -> o c p1 p2 p3``."""
    axes = _GRID_AXES[: len(patch_size)]
    sizes = {a: int(p) for a, p in zip(axes, patch_size)}
    return rearrange(weight, f"o ({' '.join(axes)} c) -> o c {' '.join(axes)}", c=in_channels, **sizes)


# ---------------------------------------------------------------------------------------- loading
def load_mae_encoder(
    network: nn.Module,
    checkpoint: Checkpoint,
    strict: bool = True,
    interpolate: bool = True,
    verbose: bool = True,
    *,
    source_grid: Sequence[int] | None = None,
    target_grid: Sequence[int] | None = None,
) -> TransferReport:
    """Load the encoder of an MAE checkpoint into a MONAI ``UNETR``, ``ViT`` or anything with a ``.vit``.

    Everything is checked before anything is written: on error the network is left untouched.
    Values are copied into the target's own tensors, so their ``requires_grad``, device and dtype
    stay as built (a learnable position table stays learnable after receiving sin-cos values; a
    fixed sin-cos table receives the pretrained values so the geometry matches pretraining exactly).
    The target's task head (``classification_head``) and, for ``UNETR``, the convolutional decoder
    are not touched. The number of attention heads cannot be read from the weights (the ``qkv``
    shape does not depend on it) and is not checked: build the target with the pretraining value.

    Args:
        network: MONAI ``UNETR`` (loads into ``network.vit``), MONAI ``ViT``, or a module exposing
            a ViT at ``.vit``; recognised by attributes, not class names.
        checkpoint: ``MAEViT`` or MONAI ``MaskedAutoEncoderViT`` weights: a ``.pt`` / ``.pth`` path
            (``torch.load(map_location="cpu", weights_only=True)``), a state dict (possibly nested
            under ``network`` / ``model`` / ``state_dict`` / ``net``, with ``module.`` or
            ``_orig_mod.`` prefixes), or the module itself.
        strict: True (default) raises on any misfit; False skips tensors that do not fit and
            reports them (``skipped``, ``missing``, ``ignored``), but still raises when the hidden
            width differs or nothing fits at all.
        interpolate: resample the position table when the target's patch grid differs from the
            checkpoint's (e.g. UNETR built for larger crops). Defaults to True; with False a grid
            change is a misfit.
        verbose: log the report with ``logging.getLogger(__name__)`` at INFO level. Defaults to True.
        source_grid: keyword-only. The checkpoint's patch grid. By default taken from a module's
            ``grid_size``, recognised from a sin-cos table, or else assumed cubic (square in 2D)
            when the number of positions changes; give it for an anisotropic learnable table.
        target_grid: keyword-only. The target's patch grid. By default ``UNETR.feat_size``,
            recognised from a fixed sin-cos table, or assumed cubic (square in 2D); give it for an
            anisotropic ``ViT`` target whose grid differs from the checkpoint's.

    Returns:
        A :class:`TransferReport` (``str(report)`` is a short summary).

    Raises:
        FileNotFoundError: when ``checkpoint`` is a path that does not exist.
        ValueError: for an unsupported ``network`` (naming its type), an unreadable checkpoint, or an
            encoder that does not fit: hidden width differs (also with ``strict=False``), depth,
            patch size, in_channels or spatial dims differ (the message names both values), or
            (``strict=True``) any tensor shape, missing or unexpected encoder key.

    Examples::

        # 3D: pretrain MAEViT on 96^3 crops with 16^3 patches, fine-tune UNETR on 128^3 crops
        >>> mae = MAEViT(1, (96, 96, 96), 16, hidden_size=768, mlp_dim=3072, num_heads=12)
        >>> unetr = UNETR(1, 14, (128, 128, 128), hidden_size=768, mlp_dim=3072, num_heads=12)
        >>> report = load_mae_encoder(unetr, "runs/mae/model_final.pt")
        >>> report.interpolated
        ['vit.patch_embedding.position_embeddings']
        # 2D classification ViT (perceptron projection) from a conv MAE; the head stays as built
        >>> mae2d = MAEViT(3, (224, 224), 16, spatial_dims=2)
        >>> vit = ViT(3, (224, 224), 16, mlp_dim=512, proj_type="perceptron", spatial_dims=2, classification=True)
        >>> load_mae_encoder(vit, mae2d).converted
        ['patch_embedding.patch_embeddings.1.weight', 'patch_embedding.position_embeddings']
    """
    vit, prefix = _find_vit(network)
    state, grid_hint, source_kind = _read_checkpoint(checkpoint)
    source, others = _split_encoder(state)
    target = {k: v for k, v in vit.state_dict(keep_vars=True).items() if _is_encoder_key(k)}
    grids = (_grid(source_grid) or grid_hint, _grid(target_grid) or _target_grid(vit, network))
    plan = _plan_transfer(source, target, _target_patch_size(vit, network), grids, interpolate, prefix)
    target_kind = getattr(vit.patch_embedding, "pos_embed_type", None)
    if source_kind and target_kind and (source_kind == "rope") != (target_kind == "rope"):
        # a RoPE encoder keeps a zero table: copied into a table-based target it would leave it without positions
        plan.errors.insert(0, f"position embedding differs: checkpoint has pos_embed_type={source_kind!r}, target has "
                              f"{target_kind!r} (rotary embeddings do not transfer into a position table or back)")  # fmt: skip
    plan.check(strict, prefix)
    with torch.no_grad():  # in place: the target keeps its requires_grad, device and dtype
        for key, value in plan.values.items():
            target[key].copy_(value.to(device=target[key].device, dtype=target[key].dtype))
    report = plan.report(others, prefix)
    if verbose:
        logger.info("%s", report)
    return report


@dataclass
class _Plan:
    """Everything decided before writing: values to copy and what does not fit."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)  # target key -> value to copy
    errors: list[str] = field(default_factory=list)  # structural misfits, named before per-tensor ones
    misfits: list[tuple[str, str]] = field(default_factory=list)  # (target key, reason)
    missing: list[str] = field(default_factory=list)  # target keys without a source value
    unexpected: list[str] = field(default_factory=list)  # source encoder keys without a target place
    unused: list[str] = field(default_factory=list)  # source keys dropped on purpose (cls_token)
    interpolated: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, target: Mapping[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        """Queue ``value`` for ``key`` when the shapes agree, else record the misfit."""
        if tuple(value.shape) == tuple(target[key].shape):
            self.values[key] = value
        else:
            shapes = f"checkpoint shape {tuple(value.shape)} != target shape {tuple(target[key].shape)}"
            self.misfits.append((key, shapes))

    def check(self, strict: bool, prefix: str) -> None:
        """Raise ``ValueError`` when the plan may not be applied."""
        if strict:
            problems = list(self.errors)
            if not problems:  # per-tensor detail only when the structure fits (otherwise it repeats the cause)
                problems += [f"{prefix}{k}: {why}" for k, why in self.misfits]
                if self.missing:
                    missing = _short([prefix + k for k in self.missing])
                    problems.append(f"target keys missing from the checkpoint: {missing}")
                if self.unexpected:
                    problems.append(f"checkpoint encoder keys with no place in the target: {_short(self.unexpected)}")
            if problems:
                raise ValueError("MAE encoder does not fit the target network: " + "; ".join(problems) + ".")
        elif not self.values:
            reasons = self.errors or [f"{prefix}{k}: {why}" for k, why in self.misfits] or ["no common keys"]
            raise ValueError("no tensor of the MAE checkpoint fits the target network: " + "; ".join(reasons) + ".")

    def report(self, others: list[str], prefix: str) -> TransferReport:
        loaded = [prefix + k for k in self.values]
        return TransferReport(
            loaded=loaded,
            interpolated=[k for k in self.interpolated if k in loaded],
            converted=[k for k in self.converted if k in loaded],
            ignored=[*others, *self.unused, *self.unexpected],
            missing=[prefix + k for k in self.missing],
            skipped=[prefix + k for k, _ in self.misfits],
            notes=[*self.notes, *(f"misfit: {e}" for e in self.errors),
                   *(f"skipped {prefix}{k}: {why}" for k, why in self.misfits)],  # fmt: skip
        )


def _plan_transfer(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    target_patch_size: tuple[int, ...] | None,
    grids: tuple[tuple[int, ...] | None, tuple[int, ...] | None],
    interpolate: bool,
    prefix: str,
) -> _Plan:
    """Match every target encoder key with a (converted, interpolated) source value; raise on width misfit."""
    plan = _Plan()
    src_width, tgt_width = _hidden_width(source), _hidden_width(target)
    if src_width is not None and tgt_width is not None and src_width != tgt_width:  # fatal even when not strict
        raise ValueError(
            f"MAE encoder does not fit the target network: hidden width differs: checkpoint has "
            f"hidden_size={src_width}, target has {tgt_width}."
        )
    src_depth, tgt_depth = _depth(source), _depth(target)
    if src_depth != tgt_depth:
        plan.errors.append(f"depth differs: checkpoint has {src_depth} blocks, target has {tgt_depth}")
    used: set[str] = set()

    # patch projection, converted between conv and perceptron
    tgt_proj, src_proj = _projection(target, target_patch_size), _projection(source)
    if src_proj is not None and tgt_proj is not None:
        plan.errors += _geometry_errors(src_proj, tgt_proj)
        src_w, src_b = (CONV_WEIGHT, CONV_BIAS) if src_proj.kind == "conv" else (LINEAR_WEIGHT, LINEAR_BIAS)
        tgt_w, tgt_b = (CONV_WEIGHT, CONV_BIAS) if tgt_proj.kind == "conv" else (LINEAR_WEIGHT, LINEAR_BIAS)
        value = source[src_w]
        if src_proj.kind != tgt_proj.kind:
            if tgt_proj.kind == "perceptron":
                value = _conv_to_linear(value)
            elif value.shape[1] == tgt_proj.in_features:
                value = _linear_to_conv(value, tgt_proj.patch_size, tgt_proj.in_channels)
            plan.converted.append(prefix + tgt_w)
        plan.add(target, tgt_w, value)
        used.add(src_w)
        if tgt_b in target and src_b in source:
            plan.add(target, tgt_b, source[src_b])
            used.add(src_b)

    # position table, resampled to the target grid
    if POS_KEY in target and POS_KEY in source:
        used.add(POS_KEY)
        dims = next((len(p.patch_size) for p in (tgt_proj, src_proj) if p is not None and p.patch_size), None)
        value = _position_table(source[POS_KEY], target[POS_KEY], prefix, plan, interpolate, *grids, dims)
        if value is not None:
            plan.add(target, POS_KEY, value)
        else:
            plan.misfits.append((POS_KEY, plan.errors[-1]))

    # everything else by name
    for key in target:
        if key not in (POS_KEY, CONV_WEIGHT, CONV_BIAS, LINEAR_WEIGHT, LINEAR_BIAS) and key in source:
            plan.add(target, key, source[key])
            used.add(key)
    misfit_keys = {k for k, _ in plan.misfits}
    # MONAI's TransformerBlock always holds a cross-attention norm that nothing uses without cross-attention;
    # EncoderBlock has none: neither side needs the other's
    plan.missing = [k for k in target if k not in plan.values and k not in misfit_keys and _UNUSED_NORM not in k]
    for key in source:
        if key not in used:
            dropped = (key == "cls_token" or _UNUSED_NORM in key) and key not in target
            (plan.unused if dropped else plan.unexpected).append(key)
    return plan


def _grid(grid: Sequence[int] | None) -> tuple[int, ...] | None:
    return tuple(int(g) for g in grid) if grid is not None else None


def _geometry_errors(src: _Projection, tgt: _Projection) -> list[str]:
    """Patch size / channel / spatial-dims misfits between two projections."""
    if src.patch_size is not None and tgt.patch_size is not None:
        errors = []
        if len(src.patch_size) != len(tgt.patch_size):
            return [
                f"spatial dims differ: checkpoint patch size {src.patch_size} is {len(src.patch_size)}D, "
                f"target patch size {tgt.patch_size} is {len(tgt.patch_size)}D"
            ]
        if src.patch_size != tgt.patch_size:
            errors.append(f"patch size differs: checkpoint has {src.patch_size}, target has {tgt.patch_size}")
        if src.in_channels is not None and tgt.in_channels is not None and src.in_channels != tgt.in_channels:
            errors.append(f"in_channels differ: checkpoint has {src.in_channels}, target has {tgt.in_channels}")
        return errors
    if src.in_features != tgt.in_features:
        geometry = ""
        if tgt.patch_size is not None and tgt.in_channels is not None:
            geometry = f" (patch size {tgt.patch_size} x {tgt.in_channels} channel(s))"
        return [
            f"patch size or in_channels differ: the checkpoint's patch projection takes prod(patch_size) * "
            f"in_channels = {src.in_features} values per patch, the target's {tgt.in_features}{geometry}"
        ]
    return []


def _position_table(
    src: torch.Tensor,
    tgt: torch.Tensor,
    prefix: str,
    plan: _Plan,
    interpolate: bool,
    src_grid: tuple[int, ...] | None,
    tgt_grid: tuple[int, ...] | None,
    dims: int | None,
) -> torch.Tensor | None:
    """The source position table fitted to the target's grid, or None (with the reason in ``plan.errors``).

    A grid is known when given, read from the network, or recognised from a sin-cos table; a grid
    guessed as a cube/square only serves when the number of positions changes.
    """
    key = prefix + POS_KEY
    n_src, n_tgt = src.shape[1], tgt.shape[1]
    src_sincos = _sincos_grid(src, dims)
    src_grid = src_grid if src_grid is not None and math.prod(src_grid) == n_src else src_sincos
    if tgt_grid is None or math.prod(tgt_grid) != n_tgt:
        tgt_grid = None if tgt.requires_grad else _sincos_grid(tgt, dims)
    value = src
    if n_src != n_tgt or (src_grid is not None and tgt_grid is not None and src_grid != tgt_grid):
        src_grid, tgt_grid = src_grid or _cubic_grid(n_src, dims), tgt_grid or _cubic_grid(n_tgt, dims)
        where = f"checkpoint has {n_src} positions (grid {src_grid}), target {n_tgt} (grid {tgt_grid})"
        if not interpolate:
            plan.errors.append(f"patch grid differs: {where}; pass interpolate=True to resample the position table")
            return None
        if src_grid is None or tgt_grid is None or len(src_grid) != len(tgt_grid):
            plan.errors.append(f"cannot infer both patch grids to interpolate the position table: {where}; "
                          "pass source_grid= and target_grid=")  # fmt: skip
            return None
        value = interpolate_pos_embed(src, src_grid, tgt_grid)
        plan.interpolated.append(key)
        plan.notes.append(f"position table interpolated from grid {src_grid} to {tgt_grid}")
    if src.shape[-1] != tgt.shape[-1]:
        return value  # width misfit: reported by the caller
    kind = "sin-cos" if src_sincos is not None else "learned"
    if tgt.requires_grad:
        plan.notes.append(f"{kind} position values copied into the target's learnable table (stays trainable)")
        if src_sincos is not None:
            plan.converted.append(key)
    else:
        plan.notes.append(f"{kind} position values copied into the target's fixed (requires_grad=False) table")
        if src_sincos is None:
            plan.converted.append(key)
    return value


# ------------------------------------------------------------------------------ residual stream
def is_positive_finite(value: Any) -> bool:
    """True for an int or float (not a bool) that is finite and > 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _residual_writers(vit: nn.Module) -> list[nn.Module]:
    """The last linear layer of every residual branch of ``vit.blocks`` (attention, cross-attention, MLP).

    Raises:
        ValueError: when a block is not a pre-norm MONAI ``TransformerBlock`` whose branches end in
            an ``nn.Linear`` (then scaling the stream would change the function).
    """
    writers: list[nn.Module] = []
    for i, block in enumerate(vit.blocks):
        branches = [getattr(block, "attn", None), getattr(block, "mlp", None)]
        norms = ["norm1", "norm2"]
        if getattr(block, "with_cross_attention", False):
            branches.append(getattr(block, "cross_attn", None))
            norms.append("norm_cross_attn")
        lasts = [getattr(b, "out_proj", None) or getattr(b, "linear2", None) for b in branches]
        if not all(isinstance(last, nn.Linear) for last in lasts) or not all(
            isinstance(getattr(block, name, None), nn.LayerNorm) for name in norms
        ):
            raise ValueError(
                f"blocks.{i} ({type(block).__name__}) is not a pre-norm transformer block whose residual branches "
                "end in nn.Linear (e.g. built with include_fc=False); its residual stream cannot be rescaled exactly."
            )
        writers.extend(lasts)
    return writers


def _reference_input(vit: nn.Module, network: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Uniform noise in [0, 1] (the range of the package's intensity transforms) of the ViT's input size."""
    embed = vit.patch_embedding
    weight = getattr(embed.patch_embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 4:  # conv projection: (hidden, in_channels, *patch)
        patch, channels = tuple(int(p) for p in weight.shape[2:]), int(weight.shape[1])
    else:  # perceptron: Rearrange + Linear(in_channels * prod(patch), hidden)
        patch = _target_patch_size(vit, network)
        linear = [m for m in embed.patch_embeddings.modules() if isinstance(m, nn.Linear)]
        channels = linear[0].in_features // math.prod(patch) if patch and linear else None
    n_tokens = int(embed.position_embeddings.shape[1])
    grid = _target_grid(vit, network)
    if patch is not None and (grid is None or math.prod(grid) != n_tokens):
        grid = _cubic_grid(n_tokens, len(patch))
    if grid is None or patch is None or not channels:
        raise ValueError(
            f"cannot infer the input size of {type(network).__name__} (patch grid unknown) for the reference batch; "
            "pass images= explicitly (or, in load_pretrained, a numeric residual_scale instead of 'auto')."
        )
    generator = torch.Generator().manual_seed(seed)  # leaves the global RNG alone
    shape = (batch, channels, *(g * p for g, p in zip(grid, patch)))
    table = embed.position_embeddings
    return torch.rand(shape, generator=generator).to(device=table.device, dtype=table.dtype)


@torch.no_grad()
def residual_stream_norm(network: nn.Module, images: torch.Tensor | None = None) -> float:
    """Mean L2 norm of the ViT's tokens over the outputs of all its blocks (what ``UNETR`` taps for skips).

    The block outputs are read with forward hooks, so any network whose encoder has ``blocks``
    works, whatever its ``forward`` returns (MONAI ``ViT`` / ``UNETR``, :class:`ViTSeg`).

    Args:
        network: MONAI ``UNETR``, MONAI ``ViT``, :class:`~monai_mae.networks.vitseg.ViTSeg` or a
            module with a ViT at ``.vit``.
        images: input batch ``(B, C, *spatial)`` at the ViT's input size; None uses a fixed batch of
            uniform noise in [0, 1] (seeded; the global RNG is not touched).

    Returns:
        The mean over blocks, batch and tokens of ``||hidden_state||_2``.
    """
    vit, _ = _find_vit(network)
    if images is None:
        images = _reference_input(vit, network)
    norms: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: norms.append(out.float().norm(dim=-1).mean())) for block in vit.blocks]
    was_training = vit.training
    vit.eval()
    try:
        vit(images)
    finally:
        vit.train(was_training)
        for hook in hooks:
            hook.remove()
    return float(torch.stack(norms).mean())


@torch.no_grad()
def rescale_residual_stream(network: nn.Module, factor: float) -> nn.Module:
    """Multiply a pre-norm ViT's residual stream by ``factor`` without changing its output.

    Scales everything that writes into the stream (patch projection, position table, ``cls_token``,
    and the last linear layer of every attention / MLP branch). Each block reads the stream through a
    LayerNorm, which ignores a common factor (up to its ``eps``, negligible unless the stream is
    tiny), so every branch's contribution and the final ``norm(x)`` stay the same, while every hidden
    state (UNETR's skip inputs) is ``factor`` times as large.

    Why: an MAE pretrained on [0, 1] intensities can end with a residual stream tens of times larger
    than a freshly initialised ViT's (the position table alone is a sin-cos table of amplitude 1).
    Fine-tuned as is, AdamW's steps (about ``lr`` per weight, whatever the weight's size) change
    such an encoder only slowly, and UNETR's decoder receives skip features far larger than the ones
    it is initialised for. Matching the stream to a fresh network's size
    (:func:`match_residual_stream`) keeps what the encoder learned and removes both effects.

    Args:
        network: MONAI ``UNETR``, MONAI ``ViT`` or a module with a ViT at ``.vit``.
        factor: positive, finite scale.

    Returns:
        ``network`` itself.

    Raises:
        ValueError: for a factor that is not positive and finite, a network without a ViT, or blocks
            whose stream cannot be scaled exactly (see ``_residual_writers``).
    """
    if not is_positive_finite(factor):
        raise ValueError(f"factor must be a positive finite number, got {factor!r}.")
    vit, _ = _find_vit(network)
    writers = _residual_writers(vit)
    tensors = [*vit.patch_embedding.patch_embeddings.parameters(), vit.patch_embedding.position_embeddings]
    if isinstance(getattr(vit, "cls_token", None), torch.Tensor):
        tensors.append(vit.cls_token)
    for writer in writers:
        tensors.extend(writer.parameters())
    for tensor in tensors:
        tensor.mul_(float(factor))
    return network


def match_residual_stream(network: nn.Module, target_norm: float, images: torch.Tensor | None = None) -> float:
    """Rescale ``network``'s residual stream so :func:`residual_stream_norm` equals ``target_norm``.

    Args:
        network: MONAI ``UNETR``, MONAI ``ViT`` or a module with a ViT at ``.vit``.
        target_norm: the mean token norm wanted, e.g. ``residual_stream_norm`` of the same network
            freshly initialised (what :func:`monai_mae.engines.finetune.load_pretrained` does with
            ``residual_scale="auto"``).
        images: as for :func:`residual_stream_norm` (measure both norms on the same images).

    Returns:
        The factor applied.

    Raises:
        ValueError: for a ``target_norm`` that is not positive and finite, or as
            :func:`rescale_residual_stream`.
    """
    if not is_positive_finite(target_norm):
        raise ValueError(f"target_norm must be a positive finite number, got {target_norm!r}.")
    current = residual_stream_norm(network, images)
    if not is_positive_finite(current):
        raise ValueError(f"the residual stream of {type(network).__name__} has norm {current}; cannot rescale it.")
    factor = target_norm / current
    rescale_residual_stream(network, factor)
    return factor
