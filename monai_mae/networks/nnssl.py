"""nnssl checkpoints of Primus / EvaMAE encoders, read as monai-mae model files and written from ours.

nnssl (MIC-DKFZ/nnssl, the OpenMind pretraining framework) saves ``checkpoint_final.pth`` as
``{"network_weights": state_dict, "nnssl_adaptation_plan": plan, "trainer_name": ..., ...}``. For its ViT
trainers the network is a patch embedding (``down_projection.proj``, a strided convolution) and an EVA encoder
(``eva.*``: timm's ``EvaBlock`` as ``dynamic_network_architectures``' ``Primus`` builds it), and the plan names the
architecture (``PrimusS/B/M/L``), where encoder and stem are (``key_to_encoder``, ``key_to_stem``), the
pretraining plan (spacing, normalisation, crop size) and a recommended downstream patch size.

:func:`nnssl_model_file` turns such a checkpoint into a monai-mae model file (``{"network": state_dict,
"monai_mae": description}``) whose encoder is :data:`~monai_mae.networks.encoder.PRIMUS_EXACT`'s; every reader of
model files then takes it as it is (``load_mae_encoder``, ``encoder_settings``, ``data_preset_for``, the
``mae_finetune`` bundle). :func:`nnssl_checkpoint` goes the other way, for the ``eva.*`` / ``down_projection.*``
keys that nnU-Net's Primus loads.

The mapping, per block: ``norm1`` / ``norm2`` / ``attn.norm`` / ``mlp.norm`` and the final ``eva.norm`` 1:1;
``attn.q_proj`` / ``k_proj`` / ``v_proj`` concatenated into ``attn.qkv`` (biases on queries and values only:
``attn.q_bias``, ``attn.v_bias``); ``attn.proj`` -> ``attn.out_proj``; ``mlp.fc1_g`` (gate) and ``mlp.fc1_x`` ->
SwiGLU's ``mlp.linear1`` (gate first); ``mlp.fc2`` -> ``mlp.linear2``; ``gamma_1`` / ``gamma_2`` -> ``ls1`` /
``ls2``. Three things are reordered, all exact permutations:

* **RoPE channels**: timm rotates neighbouring channels ``(2k, 2k + 1)`` of a head by angle ``k``, ours channel
  ``k`` with ``k + R``; query and key rows are permuted within each head.
* **Token order**: Primus (and nnssl's ``EvaSimMIM``) flatten the patch grid ``(w h d)``, nnssl's ``EvaMAE``
  (all its other ViT trainers) ``(h w d)``, while RoPE and the position table follow the sequence: an EvaMAE
  encoder's first RoPE axis and table axis run along the input's second axis. ``token_order`` (``"whd"`` /
  ``"hwd"``) says which; it is read from the file where it can be told (:func:`token_order_of`).
* **Axes**: nnssl's arrays are ``(z, y, x)`` (nnU-Net's SimpleITK order, after ``transpose_forward``), monai-mae
  orients volumes to RAS, ``(x, y, z)``. ``axes[j]`` is the nnssl array axis of our axis ``j`` (by default from
  the plan's ``transpose_forward``: ``(2, 1, 0)`` without transposition); the patch kernels, the position table
  and the RoPE axes are permuted to match, so that our encoder on a RAS volume computes what nnssl's computes on
  its own array of the same volume. ``axes=(0, 1, 2)`` keeps nnssl's array order.

Exact for cubic pretraining crops (nnssl's 160^3); an EvaMAE trained on non-cubic crops flattened its tokens
against its own RoPE grid, which no reordering reproduces.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from monai_mae.utils import strip_prefixes

__all__ = [
    "NNSSL_PLAN_KEY",
    "NNSSL_WEIGHTS_KEY",
    "PRIMUS_SIZES",
    "TOKEN_ORDERS",
    "is_nnssl_checkpoint",
    "nnssl_checkpoint",
    "nnssl_configuration",
    "nnssl_data_preset",
    "nnssl_model_file",
    "save_nnssl_checkpoint",
    "token_order_of",
]

NNSSL_PLAN_KEY = "nnssl_adaptation_plan"
NNSSL_WEIGHTS_KEY = "network_weights"
#: nnssl's Primus architectures: name -> (width, depth, heads); the heads cannot be read from the weights.
PRIMUS_SIZES: dict[str, tuple[int, int, int]] = {
    "PrimusS": (396, 12, 6),
    "PrimusB": (792, 12, 12),
    "PrimusM": (864, 16, 12),
    "PrimusL": (1056, 24, 16),
}
#: token order -> the input axis along which each axis of the token sequence's grid runs.
TOKEN_ORDERS: dict[str, tuple[int, int, int]] = {"whd": (0, 1, 2), "hwd": (1, 0, 2)}
#: normalisation schemes of nnssl's plans -> monai-mae modality (``mri``: z-score over the foreground)
NORMALIZATIONS = {"ZScoreNormalization": "mri"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def is_nnssl_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (what ``torch.load`` returned) is an nnssl checkpoint: weights beside an adaptation plan."""
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get(NNSSL_PLAN_KEY), Mapping)
        and isinstance(obj.get(NNSSL_WEIGHTS_KEY), Mapping)
    )


# ------------------------------------------------------------------ the plan
def nnssl_configuration(plan: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """The pretraining configuration of an adaptation plan (spacing, normalisation, crop size).

    ``pretrain_plan.configurations`` is either one configuration (nnssl's own example) or a dict of named ones
    (what its trainers save).

    Args:
        plan: the checkpoint's ``nnssl_adaptation_plan``.
        name: which named configuration; None: the only one (or ``"onemmiso"``, nnssl's default, among several).

    Raises:
        ValueError: for a plan without configurations, an unknown ``name``, or several configurations and no name.
    """
    configurations = (plan.get("pretrain_plan") or {}).get("configurations")
    if not isinstance(configurations, Mapping) or not configurations:
        raise ValueError(f"the nnssl adaptation plan has no pretrain_plan.configurations (got {configurations!r}).")
    if "spacing" in configurations or "normalization_schemes" in configurations:
        return dict(configurations)  # one configuration
    names = sorted(configurations)
    if name is None:
        name = names[0] if len(names) == 1 else "onemmiso" if "onemmiso" in names else None
    if name not in configurations:
        raise ValueError(f"the nnssl adaptation plan has configurations {names}; pass configuration= one of them.")
    return dict(configurations[name])


def _reader_axes(plan: Mapping[str, Any]) -> tuple[int, ...]:
    """nnssl array axis of each RAS axis: arrays are ``(z, y, x)`` transposed by ``transpose_forward``."""
    forward = list((plan.get("pretrain_plan") or {}).get("transpose_forward") or (0, 1, 2))
    if sorted(forward) != [0, 1, 2]:
        raise ValueError(f"the nnssl plan's transpose_forward {forward} is no permutation of (0, 1, 2).")
    return tuple(forward.index(2 - j) for j in range(3))


def _check_axes(axes: Sequence[int]) -> tuple[int, ...]:
    axes = tuple(int(a) for a in axes)
    if sorted(axes) != [0, 1, 2]:
        raise ValueError(f"axes must be a permutation of (0, 1, 2), got {axes}.")
    return axes


def nnssl_data_preset(
    plan: Mapping[str, Any], configuration: str | None = None, axes: Sequence[int] | None = None
) -> dict[str, Any]:
    """The monai-mae data preset of an nnssl pretraining plan.

    ``ZScoreNormalization`` becomes ``modality="mri"`` (z-score over the foreground, per channel); the spacing,
    in nnssl's array order, becomes ``pixdim`` in RAS order (``axes``); orientation RAS (nnssl's
    ``NibabelIOWithReorient`` reorients to RAS as well); ``roi_size`` is the plan's recommended downstream
    patch size.

    Args:
        plan: the checkpoint's ``nnssl_adaptation_plan``.
        configuration: the named configuration (see :func:`nnssl_configuration`).
        axes: nnssl array axis of each of our axes; None: from the plan's ``transpose_forward``.

    Raises:
        ValueError: for a normalisation other than ``ZScoreNormalization`` (the message names it) or a plan
            without spacing.
    """
    config = nnssl_configuration(plan, configuration)
    axes = _check_axes(axes) if axes is not None else _reader_axes(plan)
    schemes = list(config.get("normalization_schemes") or [])
    unknown = sorted({s for s in schemes if s not in NORMALIZATIONS})
    if not schemes or unknown:
        raise ValueError(
            f"the nnssl plan normalises with {schemes}; monai-mae maps {sorted(NORMALIZATIONS)} (to z-score, "
            "modality 'mri') only."
        )
    spacing = config.get("spacing")
    if spacing is None or len(spacing) != 3:
        raise ValueError(f"the nnssl plan's configuration has spacing {spacing!r}; expected 3 values.")
    preset: dict[str, Any] = {
        "modality": NORMALIZATIONS[schemes[0]],
        "pixdim": [float(spacing[a]) for a in axes],
        "orientation": "RAS",
        "in_channels": int(plan.get("pretrain_num_input_channels", len(schemes))),
        "spatial_dims": 3,
    }
    roi = plan.get("recommended_downstream_patchsize")
    if roi is not None and len(roi) == 3:
        preset["roi_size"] = [int(roi[a]) for a in axes]
    return preset


# ------------------------------------------------------------------ token order
def token_order_of(obj: Mapping[str, Any]) -> str | None:
    """The token order an nnssl checkpoint was trained in, where the file tells it; None where it does not.

    ``"whd"`` for Primus' flattening (nnssl's ``SimMIMEvaTrainer``, files written by monai-mae), ``"hwd"`` for
    nnssl's ``EvaMAE`` (its other ViT trainers: a ``trainer_name`` with ``Eva``, or an EvaMAE decoder
    ``decoder.blocks.*`` beside the encoder).
    """
    recorded = obj.get("token_order")
    if recorded in TOKEN_ORDERS:
        return str(recorded)
    trainer = str(obj.get("trainer_name") or "")
    if "SimMIM" in trainer:
        return "whd"
    if "Eva" in trainer:
        return "hwd"
    weights = obj.get(NNSSL_WEIGHTS_KEY)
    if isinstance(weights, Mapping) and any(strip_prefixes(str(k)).startswith("decoder.blocks.") for k in weights):
        return "hwd"
    return None


# ------------------------------------------------------------------ index maps (all exact permutations)
def _rope_rows(head_dim: int, heads: int, angle_axes: Sequence[int]) -> torch.Tensor:
    """``rows`` with ``ours[rows] = theirs`` for the query / key rows of all heads.

    timm's channel pair ``(2k, 2k + 1)``, ``k = a * P + i`` (axis ``a`` of its RoPE grid, band ``i``), is our pair
    ``(m, R + m)`` with ``m = angle_axes[a] * P + i``, ``R = 3 P``.
    """
    pairs = head_dim // 6
    rotated = 3 * pairs
    if 2 * rotated != head_dim:
        raise ValueError(f"timm's 3D RoPE rotates every channel of a head: head width {head_dim} is no multiple of 6.")
    ours = [angle_axes[k // pairs] * pairs + k % pairs for k in range(rotated)]
    order = torch.tensor([c for m in ours for c in (m, rotated + m)])
    return (order + head_dim * torch.arange(heads)[:, None]).flatten()


def _sequence_to_ours(token_order: str, axes: Sequence[int]) -> tuple[int, ...]:
    """For each axis of nnssl's token grid, our axis (it runs along input axis ``TOKEN_ORDERS[...][a]``)."""
    return tuple(axes.index(model_axis) for model_axis in TOKEN_ORDERS[token_order])


def _table_to_ours(table: torch.Tensor, grid: Sequence[int], seq_to_ours: Sequence[int]) -> torch.Tensor:
    """nnssl's table ``(1, N, C)`` over its token grid ``grid`` -> ours over our axes."""
    width = table.shape[-1]
    ours_to_seq = [seq_to_ours.index(j) for j in range(3)]
    return table.reshape(*grid, width).permute(*ours_to_seq, 3).reshape(1, -1, width)


def _table_to_nnssl(table: torch.Tensor, our_grid: Sequence[int], seq_to_ours: Sequence[int]) -> torch.Tensor:
    width = table.shape[-1]
    return table.reshape(*our_grid, width).permute(*seq_to_ours, 3).reshape(1, -1, width).contiguous()


def _kernel_to_ours(weight: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    return weight.permute(0, 1, *(2 + a for a in axes)).contiguous()


def _kernel_to_nnssl(weight: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    return weight.permute(0, 1, *(2 + axes.index(i) for i in range(3))).contiguous()


#: block tensors that map 1:1, ours -> timm's (``.weight`` / ``.bias`` of modules; LayerScale vectors as named)
_SAME_MODULES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.norm": "attn.norm",
    "mlp.norm": "mlp.norm",
    "attn.out_proj": "attn.proj",
    "mlp.linear2": "mlp.fc2",
}
_SAME_TENSORS = {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}


def _same_names() -> dict[str, str]:
    names = {
        f"{ours}.{part}": f"{theirs}.{part}" for ours, theirs in _SAME_MODULES.items() for part in ("weight", "bias")
    }
    return {**names, **_SAME_TENSORS}


def _block_to_ours(p: Mapping[str, torch.Tensor], inverse: torch.Tensor) -> dict[str, torch.Tensor]:
    """One EVA block (timm's names) in ``EncoderBlock`` naming; ``ours = theirs[inverse]`` for query / key rows."""
    block = {ours: p[theirs] for ours, theirs in _same_names().items() if theirs in p}
    q, k, v = (p[f"attn.{n}_proj.weight"] for n in "qkv")
    block["attn.qkv.weight"] = torch.cat([q[inverse], k[inverse], v])
    block["attn.q_bias"], block["attn.v_bias"] = p["attn.q_proj.bias"][inverse], p["attn.v_proj.bias"]
    block["mlp.linear1.weight"] = torch.cat([p["mlp.fc1_g.weight"], p["mlp.fc1_x.weight"]])  # gate first
    block["mlp.linear1.bias"] = torch.cat([p["mlp.fc1_g.bias"], p["mlp.fc1_x.bias"]])
    return block


def _block_to_nnssl(s: Mapping[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """One ``EncoderBlock`` in timm's EVA naming; ``theirs = ours[rows]`` for query / key rows."""
    block = {theirs: s[ours] for ours, theirs in _same_names().items() if ours in s}
    q, k, v = s["attn.qkv.weight"].chunk(3)
    block.update({"attn.q_proj.weight": q[rows], "attn.k_proj.weight": k[rows], "attn.v_proj.weight": v})
    block["attn.q_proj.bias"], block["attn.v_proj.bias"] = s["attn.q_bias"][rows], s["attn.v_bias"]
    block["mlp.fc1_g.weight"], block["mlp.fc1_x.weight"] = s["mlp.linear1.weight"].chunk(2)
    block["mlp.fc1_g.bias"], block["mlp.fc1_x.bias"] = s["mlp.linear1.bias"].chunk(2)
    return block


# ------------------------------------------------------------------ nnssl -> monai-mae
def _heads(architecture: str, width: int, num_heads: int | None, source: str) -> int:
    if num_heads is not None:
        if num_heads < 1 or width % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide the width {width} of {source}.")
        return int(num_heads)
    size = PRIMUS_SIZES.get(architecture)
    if size is None or size[0] != width:
        expected = f"width {size[0]}" if size else "no known size"
        raise ValueError(
            f"{source} names architecture {architecture!r} ({expected}) but its encoder has width {width}: the "
            "number of heads cannot be read from the weights; pass num_heads=, e.g. read_nnssl_checkpoint(path, "
            "num_heads=...)."
        )
    return size[2]


def _encoder_grid(config: Mapping[str, Any], patch: Sequence[int], rows: int, source: str) -> tuple[int, ...]:
    """The pretraining patch grid over nnssl's array axes (crop size / patch size), checked against the table."""
    crop = config.get("patch_size")
    if crop is not None and len(crop) == 3:
        grid = tuple(int(c) // int(p) for c, p in zip(crop, patch))
        if math.prod(grid) == rows:
            return grid
    side = round(rows ** (1 / 3))
    if side**3 == rows:
        return (side,) * 3
    raise ValueError(f"cannot tell the patch grid of the position table of {source} ({rows} rows, crop {crop}).")


def nnssl_model_file(
    obj: Mapping[str, Any],
    token_order: str | None = None,
    num_heads: int | None = None,
    axes: Sequence[int] | None = None,
    configuration: str | None = None,
    source: str = "the nnssl checkpoint",
) -> dict[str, Any]:
    """A monai-mae model file (``{"network": state_dict, "monai_mae": description}``) of an nnssl checkpoint.

    The weights are the encoder's in ``MAEViT`` / ``ViTSeg`` naming (``patch_embedding.*``, ``blocks.N.*``,
    ``norm.*``); the description's ``network`` is a :class:`~monai_mae.networks.encoder.ViTEncoder` with the
    Primus-exact options (its keys are what ``encoder_settings`` passes to ``ViTSeg``), its ``data_preset``
    :func:`nnssl_data_preset`'s, its ``run`` what the file says of itself.

    Args:
        obj: the loaded ``checkpoint_final.pth``.
        token_order: ``"whd"`` (Primus) or ``"hwd"`` (nnssl's EvaMAE); None: read from the file
            (:func:`token_order_of`).
        num_heads: attention heads; None: from the architecture name (``PrimusS/B/M/L``), which must fit the width.
        axes: nnssl array axis of each of our axes; None: from the plan (RAS order).
        configuration: the plan's named configuration, where it has several.
        source: how messages name the checkpoint.

    Raises:
        ValueError: for a CNN (ResEnc) or other non-Primus architecture, a deeper stem (Primus V2 / V3), register
            tokens, an unknown token order, heads that cannot be told, or missing encoder weights.
    """
    if not is_nnssl_checkpoint(obj):
        raise ValueError(f"{source} is no nnssl checkpoint (it needs '{NNSSL_WEIGHTS_KEY}' and '{NNSSL_PLAN_KEY}').")
    plan = obj[NNSSL_PLAN_KEY]
    architecture = str((plan.get("architecture_plans") or {}).get("arch_class_name"))
    supported = ", ".join(PRIMUS_SIZES)
    if architecture not in PRIMUS_SIZES:
        kind = "a CNN" if "Res" in architecture or "Conv" in architecture else "an architecture"
        raise ValueError(
            f"{source} holds {kind} ({architecture!r}); monai-mae reads nnssl checkpoints of ViT encoders "
            f"({supported}: Primus and EvaMAE pretraining) only."
        )
    weights = {strip_prefixes(str(k)): v for k, v in obj[NNSSL_WEIGHTS_KEY].items() if isinstance(v, torch.Tensor)}
    encoder, stem = str(plan.get("key_to_encoder", "eva")), str(plan.get("key_to_stem", "down_projection"))
    theirs = {k[len(encoder) + 1 :]: v for k, v in weights.items() if k.startswith(encoder + ".")}
    kernel, kernel_bias = weights.get(f"{stem}.proj.weight"), weights.get(f"{stem}.proj.bias")
    if kernel is None or kernel.ndim != 5 or not any(_BLOCK.match(k) for k in theirs):
        raise ValueError(
            f"{source} ({architecture}) has no patch embedding '{stem}.proj.weight' (a 3D convolution) or no "
            f"encoder blocks '{encoder}.blocks.N.*'; monai-mae reads the Primus stem (Primus V2 / V3 stems are not "
            f"supported). Its keys start with {sorted({k.split('.')[0] for k in weights})}."
        )
    if "register_tokens" in weights or any(k.startswith("register_tokens") for k in theirs):
        raise ValueError(f"{source} has register tokens, which monai-mae's encoder does not have.")
    token_order = token_order if token_order is not None else token_order_of(obj)
    if token_order not in TOKEN_ORDERS:
        raise ValueError(
            f"token_order of {source} is {token_order!r}: the file does not tell whether its tokens were flattened "
            "'whd' (Primus, nnssl's SimMIM) or 'hwd' (nnssl's EvaMAE); pass token_order='whd' or 'hwd', e.g. "
            "read_nnssl_checkpoint(path, token_order='hwd')."
        )
    axes = _check_axes(axes) if axes is not None else _reader_axes(plan)
    width, in_channels, patch = kernel.shape[0], kernel.shape[1], tuple(kernel.shape[2:])
    heads = _heads(architecture, width, num_heads, source)
    depth = 1 + max(int(_BLOCK.match(k).group(1)) for k in theirs if _BLOCK.match(k))
    config = nnssl_configuration(plan, configuration)
    seq_to_ours = _sequence_to_ours(token_order, axes)
    rows = _rope_rows(width // heads, heads, seq_to_ours)
    inverse = torch.argsort(rows)  # ours = theirs[inverse]

    state: dict[str, torch.Tensor] = {
        "patch_embedding.patch_embeddings.weight": _kernel_to_ours(kernel, axes),
        "patch_embedding.patch_embeddings.bias": kernel_bias,
    }
    if "norm.weight" not in theirs:
        raise ValueError(f"{source} has no final norm '{encoder}.norm.weight'.")
    state.update({"norm.weight": theirs["norm.weight"], "norm.bias": theirs["norm.bias"]})
    table = theirs.get("pos_embed")
    crop = config.get("patch_size") or ()
    model_grid = tuple(int(c) // int(p) for c, p in zip(crop, patch))
    if table is not None:
        model_grid = _encoder_grid(config, patch, table.shape[1], source)
        seq_grid = [model_grid[a] for a in TOKEN_ORDERS[token_order]]
        state["patch_embedding.position_embeddings"] = _table_to_ours(table, seq_grid, seq_to_ours)
    for i in range(depth):
        block = {k[len(f"blocks.{i}.") :]: v for k, v in theirs.items() if k.startswith(f"blocks.{i}.")}
        try:
            state.update({f"blocks.{i}.{k}": v for k, v in _block_to_ours(block, inverse).items()})
        except KeyError as err:
            raise ValueError(
                f"{source}: block {i} has no {err}; monai-mae reads EVA blocks with separate q/k/v projections "
                f"(q and v biases) and SwiGLU (its keys: {sorted(block)})."
            ) from err
    first = {k[len("blocks.0.") :] for k in theirs if k.startswith("blocks.0.")}
    grid = model_grid if len(model_grid) == 3 else (1, 1, 1)  # no crop size and no table: unknown
    network = {
        "_target_": "monai_mae.networks.encoder.ViTEncoder",
        "in_channels": int(in_channels),
        "img_size": [int(grid[a] * patch[a]) for a in axes],
        "patch_size": [int(patch[a]) for a in axes],
        "hidden_size": int(width),
        "mlp_dim": int(theirs["blocks.0.mlp.fc1_g.weight"].shape[0]),
        "num_layers": depth,
        "num_heads": heads,
        "qkv_bias": "qv",
        "proj_type": "conv",
        "pos_embed_type": "rope",
        "mlp_type": "swiglu",
        "layer_scale_init": 0.1 if "gamma_1" in first else None,
        "rope_theta": 10000.0,
        "attn_norm": "attn.norm.weight" in first,
        "mlp_norm": "mlp.norm.weight" in first,
        "abs_pos_embed": table is not None,
        "spatial_dims": 3,
    }
    run = {
        "source": "nnssl",
        "architecture": architecture,
        "trainer_name": obj.get("trainer_name"),
        "token_order": token_order,
        "axes": list(axes),
    }
    description = {
        "format_version": 1,
        "network": network,
        "data_preset": nnssl_data_preset(plan, configuration, axes),
        "run": run,
    }
    return {"network": state, "monai_mae": description}


# ------------------------------------------------------------------ monai-mae -> nnssl
def _architecture_of(width: int, heads: int, depth: int) -> str:
    for name, size in PRIMUS_SIZES.items():
        if size[0] == width and size[2] == heads:
            return name
    sizes = ", ".join(f"{n} {w} wide / {h} heads" for n, (w, _, h) in PRIMUS_SIZES.items())
    raise ValueError(f"an nnssl checkpoint names a Primus size ({sizes}); the encoder is {width} wide, {heads} heads.")


def nnssl_checkpoint(
    network: nn.Module,
    data_preset: Mapping[str, Any] | None = None,
    axes: Sequence[int] = (2, 1, 0),
    architecture: str | None = None,
    trainer_name: str = "monai_mae",
) -> dict[str, Any]:
    """An nnssl checkpoint (``network_weights``, ``nnssl_adaptation_plan``) of a Primus-exact encoder.

    The weights are ``down_projection.proj.*`` and ``eva.*`` (``pos_embed``, ``blocks.N.*``, ``norm.*``), the keys
    nnU-Net's Primus loads from ``key_to_stem`` / ``key_to_encoder``; tokens in Primus' ``(w h d)`` order
    (``token_order: "whd"`` beside them).

    Args:
        network: an :class:`~monai_mae.networks.mae.MAEViT` or :class:`~monai_mae.networks.vitseg.ViTSeg` (3D, one
            input channel or more, no class token) with the Primus-exact options (``primus_*`` presets).
        data_preset: its data preset (``modality`` ``"mri"``, ``pixdim`` in RAS order, ``roi_size``); None: 1 mm.
        axes: nnssl array axis of each of our axes. Defaults to ``(2, 1, 0)`` (RAS -> nnssl's ``(z, y, x)``).
        architecture: ``PrimusS/B/M/L``; None: from width and heads (a Primus size).
        trainer_name: written as the checkpoint's ``trainer_name``.

    Raises:
        ValueError: for a network without the Primus-exact options, a class token, a 2D network, a width / heads
            that is no Primus size (unless ``architecture`` is given), or a CT preset.
    """
    args = getattr(network, "init_args", None) or {}
    needed = dict(
        qkv_bias="qv", pos_embed_type="rope", mlp_type="swiglu", rope_theta=10000.0, mlp_norm=True, spatial_dims=3
    )
    wrong = {k: args.get(k) for k, v in needed.items() if args.get(k) != v}
    if wrong or getattr(network, "cls_token", None) is not None:
        raise ValueError(
            f"an nnssl checkpoint holds a Primus encoder: the network needs {needed} and no class token; it has "
            f"{wrong or 'a class token'} (build it from a primus_* preset)."
        )
    axes = _check_axes(axes)
    heads, width = int(args["num_heads"]), int(args["hidden_size"])
    ours = {k: v.detach() for k, v in network.state_dict().items()}
    depth = sum(1 for k in ours if k.startswith("blocks.") and k.endswith(".norm1.weight"))
    architecture = architecture or _architecture_of(width, heads, depth)
    preset = dict(data_preset or {"modality": "mri", "pixdim": [1.0, 1.0, 1.0]})
    if preset.get("modality", "mri") != "mri":
        raise ValueError(
            f"nnssl plans normalise with z-scores (modality 'mri'); the preset has {preset['modality']!r}."
        )
    seq_to_ours = _sequence_to_ours("whd", axes)
    rows = _rope_rows(width // heads, heads, seq_to_ours)
    theirs: dict[str, torch.Tensor] = {
        "down_projection.proj.weight": _kernel_to_nnssl(ours["patch_embedding.patch_embeddings.weight"], axes),
        "down_projection.proj.bias": ours["patch_embedding.patch_embeddings.bias"],
    }
    grid = tuple(int(g) for g in network.grid_size)
    if args.get("abs_pos_embed"):
        theirs["eva.pos_embed"] = _table_to_nnssl(ours["patch_embedding.position_embeddings"], grid, seq_to_ours)
    for i in range(depth):
        block = {k[len(f"blocks.{i}.") :]: v for k, v in ours.items() if k.startswith(f"blocks.{i}.")}
        theirs.update({f"eva.blocks.{i}.{k}": v for k, v in _block_to_nnssl(block, rows).items()})
    theirs["eva.norm.weight"], theirs["eva.norm.bias"] = ours["norm.weight"], ours["norm.bias"]
    theirs = {k: v.contiguous().clone() for k, v in theirs.items()}
    return {
        NNSSL_WEIGHTS_KEY: theirs,
        NNSSL_PLAN_KEY: _adaptation_plan(architecture, preset, axes, grid, network, int(args["in_channels"])),
        "trainer_name": trainer_name,
        "token_order": "whd",
    }


def _adaptation_plan(
    architecture: str,
    preset: Mapping[str, Any],
    axes: Sequence[int],
    grid: Sequence[int],
    network: nn.Module,
    in_channels: int,
) -> dict[str, Any]:
    """The serialised ``AdaptationPlan`` (nnssl's ``AdaptationPlan.serialize()`` layout) of an exported encoder."""
    to_nnssl = [axes.index(i) for i in range(3)]  # our axis of each nnssl axis
    pixdim = [float(v) for v in preset.get("pixdim") or (1.0, 1.0, 1.0)]
    crop = [int(g) * int(p) for g, p in zip(grid, network.patch_size)]
    roi = list(preset.get("roi_size") or crop)
    configuration = {
        "data_identifier": "nnsslPlans_onemmiso",
        "preprocessor_name": "DefaultPreprocessor",
        "spacing_style": "onemmiso" if set(pixdim) == {1.0} else "median",
        "normalization_schemes": ["ZScoreNormalization"] * in_channels,
        "use_mask_for_norm": [False] * in_channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_mask": "resample_data_or_seg_to_shape",
        "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "spacing": [pixdim[j] for j in to_nnssl],
        "patch_size": [crop[j] for j in to_nnssl],
    }
    forward = [0, 0, 0]  # the transpose_forward that gives these axes (see _reader_axes)
    for j, axis in enumerate(axes):
        forward[axis] = 2 - j
    return {
        "architecture_plans": {
            "arch_class_name": architecture,
            "arch_kwargs": None,
            "arch_kwargs_requiring_import": None,
        },
        "pretrain_plan": {
            "dataset_name": "monai_mae",
            "plans_name": "nnsslPlans",
            "original_median_spacing_after_transp": [pixdim[j] for j in to_nnssl],
            "image_reader_writer": "NibabelIOWithReorient",
            "transpose_forward": forward,
            "transpose_backward": [forward.index(i) for i in range(3)],
            "configurations": {"onemmiso": configuration},
            "experiment_planner_used": "monai_mae",
        },
        "pretrain_num_input_channels": in_channels,
        "recommended_downstream_patchsize": [int(roi[j]) for j in to_nnssl],
        "key_to_encoder": "eva",
        "key_to_stem": "down_projection",
        "keys_to_in_proj": ["down_projection.proj"],
        "key_to_lpe": "eva.pos_embed",
    }


def save_nnssl_checkpoint(
    network: nn.Module, path: str | os.PathLike, data_preset: Mapping[str, Any] | None = None, **kwargs: Any
) -> str:
    """Write :func:`nnssl_checkpoint` of ``network`` to ``path`` (``checkpoint_final.pth``); returns the path.

    ``kwargs`` go to :func:`nnssl_checkpoint` (``axes``, ``architecture``, ``trainer_name``).
    """
    torch.save(nnssl_checkpoint(network, data_preset, **kwargs), path)
    return os.fspath(path)
