"""Fit a pretrained MAE encoder into MONAI's ``UNETR`` or ``ViT``, or a ``ViTSeg``, for fine-tuning.

The encoder of :class:`~monai_mae.networks.mae.MAEViT` is named as in MONAI's ``ViT``
(``patch_embedding.*``, ``cls_token``, ``blocks.N.*``, ``norm.*``), so most tensors copy across
unchanged. On top of reading the checkpoint (:mod:`monai_mae.networks.checkpoint_io`: nested bundle /
Ignite checkpoints, ``module.`` / ``_orig_mod.`` prefixes, MONAI's ``MaskedAutoEncoderViT`` layout,
decoder dropped), :func:`load_mae_encoder` does what a plain ``load_state_dict`` does not do:

* drop a ``cls_token`` the target has no use for;
* interpolate the position table when the target is built for another patch grid;
* convert the patch projection between ``conv`` and ``perceptron`` (same function, other layout);
* check the whole fit (width, depth, patch size, channels, position kind, every shape) before
  writing anything, and report what it did (:class:`TransferReport`).

Rescaling the residual stream after the transfer is :mod:`monai_mae.networks.residual`'s job.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from einops import rearrange

from monai_mae.networks.checkpoint_adapters import BLOCK_KEY, is_encoder_key
from monai_mae.networks.checkpoint_io import Checkpoint, read_checkpoint, short_keys, split_encoder
from monai_mae.networks.pos_embed import interpolate_pos_embed, sincos_pos_embed
from monai_mae.networks.vit_geometry import GRID_AXES, cubic_grid, vit_grid, vit_patch_size
from monai_mae.utils import find_vit, unwrap

__all__ = ["TransferReport", "load_mae_encoder"]

logger = logging.getLogger(__name__)

POS_KEY = "patch_embedding.position_embeddings"
CONV_WEIGHT, CONV_BIAS = "patch_embedding.patch_embeddings.weight", "patch_embedding.patch_embeddings.bias"
LINEAR_WEIGHT, LINEAR_BIAS = "patch_embedding.patch_embeddings.1.weight", "patch_embedding.patch_embeddings.1.bias"
_UNUSED_NORM = ".norm_cross_attn."


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
                lines.append(f"  {name}: {short_keys(keys)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- target
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
    return len({int(m.group(1)) for m in map(BLOCK_KEY.match, state) if m})


def _conv_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """``(D, C, *P) -> (D, prod(P) * C)``: ``o c p1 p2 p3 -> o (p1 p2 p3 c)`` (token layout, channel last)."""
    return rearrange(weight, "o c ... -> o (... c)")


def _linear_to_conv(weight: torch.Tensor, patch_size: Sequence[int], in_channels: int) -> torch.Tensor:
    """``(D, prod(P) * C) -> (D, C, *P)``: ``o (p1 p2 p3 c) -> o c p1 p2 p3``."""
    axes = GRID_AXES[: len(patch_size)]
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

        >>> from monai.networks.nets import UNETR, ViT
        >>> from monai_mae.networks.mae import MAEViT
        >>> width = dict(hidden_size=48, mlp_dim=96, num_heads=4)
        >>> decoder = dict(decoder_hidden_size=24, decoder_mlp_dim=48, decoder_num_layers=1, decoder_num_heads=4)
        >>> # 3D: pretrain MAEViT on 32^3 crops with 16^3 patches, fine-tune UNETR (12 blocks) on 64^3 crops
        >>> mae = MAEViT(1, 32, 16, num_layers=12, **width, **decoder)
        >>> unetr = UNETR(1, 3, 64, feature_size=8, **width)
        >>> report = load_mae_encoder(unetr, mae.state_dict())
        >>> report.interpolated
        ['vit.patch_embedding.position_embeddings']
        >>> # 2D classification ViT (perceptron projection) from a conv MAE; the head stays as built
        >>> mae2d = MAEViT(3, (32, 32), 16, num_layers=2, spatial_dims=2, **width, **decoder)
        >>> vit = ViT(3, (32, 32), 16, num_layers=2, proj_type="perceptron", spatial_dims=2, classification=True, **width)
        >>> load_mae_encoder(vit, mae2d).converted
        ['patch_embedding.patch_embeddings.1.weight', 'patch_embedding.position_embeddings']

    From the pretraining bundle's model file::

        report = load_mae_encoder(unetr, "runs/mae/models/model.pt")
        print(report)  # tensors loaded, interpolated and converted; keys ignored, missing and skipped
    """
    vit, prefix = find_vit(network, "load_mae_encoder")
    state, grid_hint, source_kind, _ = read_checkpoint(checkpoint)
    source, others = split_encoder(state)
    target = {k: v for k, v in vit.state_dict(keep_vars=True).items() if is_encoder_key(k)}
    owner = unwrap(network)  # the network's own attributes (UNETR.feat_size, patch_size), not a DDP wrapper's
    grids = (_grid(source_grid) or grid_hint, _grid(target_grid) or vit_grid(vit, owner))
    plan = _plan_transfer(source, target, vit_patch_size(vit, owner), grids, interpolate, prefix)
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
                    missing = short_keys([prefix + k for k in self.missing])
                    problems.append(f"target keys missing from the checkpoint: {missing}")
                if self.unexpected:
                    problems.append(
                        f"checkpoint encoder keys with no place in the target: {short_keys(self.unexpected)}"
                    )
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
            notes=[
                *self.notes,
                *(f"misfit: {e}" for e in self.errors),
                *(f"skipped {prefix}{k}: {why}" for k, why in self.misfits),
            ],  # fmt: skip
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
        src_grid, tgt_grid = src_grid or cubic_grid(n_src, dims), tgt_grid or cubic_grid(n_tgt, dims)
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
