"""Fine-tuning a pretrained MAE encoder inside MONAI's ``UNETR`` (or ``ViT``).

Three pieces the ``mae_finetune`` bundle plugs into the stock MONAI engines:

* :func:`layerwise_lr_groups`: AdamW parameter groups with layer-wise learning-rate decay (BEiT /
  MAE fine-tuning recipe), each group tagged with its ``lr_scale``;
* :class:`FreezeEncoder`: an Ignite handler that keeps the ViT encoder frozen for the first epochs
  (decoder warm-up) and unfreezes it afterwards;
* :func:`load_pretrained`: load an MAE checkpoint with
  :func:`~monai_mae.networks.transfer.load_mae_encoder`, or train from scratch when none is given;

and :func:`save_metrics_json` to write an evaluator's metrics to a JSON file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from monai_mae.engines.distributed import rewrap_ddp
from monai_mae.model_file import read_model
from monai_mae.networks.mim import load_mim_weights
from monai_mae.networks.residual import match_residual_stream, rescale_residual_stream, residual_stream_norm
from monai_mae.networks.transfer import load_mae_encoder
from monai_mae.utils import atomic_write, find_vit, is_positive_finite, no_weight_decay, unwrap, vit_of

__all__ = ["layerwise_lr_groups", "encoder_parameters", "FreezeEncoder", "load_pretrained", "save_metrics_json"]

logger = logging.getLogger(__name__)


def has_vit(network: nn.Module) -> bool:
    """True when ``network`` (unwrapped) is a ViT or holds one at ``.vit`` (what :func:`find_vit` finds)."""
    return vit_of(network) is not None


def encoder_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The parameters of the ViT encoder: patch embedding, ``cls_token``, ``blocks`` and final ``norm``.

    That is all of ``network.vit`` for a ``UNETR``; for a ``ViT`` the task head
    (``classification_head``) and for a :class:`~monai_mae.networks.vitseg.ViTSeg` the decoder and
    head are not part of the encoder.

    Args:
        network: MONAI ``UNETR``, MONAI ``ViT``, ``ViTSeg`` or a module with a ViT at ``.vit``.

    Returns:
        The encoder's parameters, trainable or not, in registration order.

    Raises:
        ValueError: when ``network`` holds no ViT.
    """
    vit, _ = find_vit(network, "encoder_parameters")
    parts = [getattr(vit, name, None) for name in ("patch_embedding", "cls_token", "blocks", "norm")]
    encoder = {id(p) for part in parts if isinstance(part, nn.Module) for p in part.parameters()}
    encoder |= {id(part) for part in parts if isinstance(part, nn.Parameter)}
    return [p for p in vit.parameters() if id(p) in encoder]


def layerwise_lr_groups(
    network: nn.Module, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75, encoder_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise learning-rate decay for a ``UNETR`` or ``ViT``.

    The layer ids follow the MAE / BEiT fine-tuning code: the patch embedding (projection,
    position table, ``cls_token``) is layer 0, ViT block ``i`` (0-based) is layer ``i + 1``, and
    everything else (the encoder's final ``norm``, UNETR's convolutional decoder, a classification
    head) is layer ``L + 1`` with ``L`` the number of blocks. A parameter of layer ``k`` gets
    ``lr * layer_decay ** (L + 1 - k)``, that is:

    ====================  ======================================
    patch embedding       ``lr * layer_decay ** (L + 1)``
    block ``i``           ``lr * layer_decay ** (L - i)``
    everything else       ``lr``
    ====================  ======================================

    On top of that, every encoder parameter (:func:`encoder_parameters`) is multiplied by
    ``encoder_lr_scale``: a lower peak rate for pretrained weights than for the new decoder, as in
    nnssl's fine-tuning recipe.

    A CNN (no ViT) gets one rate for all its layers, except that with ``encoder_lr_scale < 1`` the
    tensors loaded from a masked-image model (``pretrained_names``, recorded by
    :func:`~monai_mae.networks.mim.load_mim_weights`) run at ``lr * encoder_lr_scale`` and the
    rest (the new output head) at ``lr``; ``layer_decay`` must then be 1.0.

    1-D parameters (biases, norms) and ``cls_token`` / position tables get no weight decay.
    Parameters with ``requires_grad=False`` (e.g. a fixed sin-cos table) are left out; build the
    optimizer *before* freezing anything (:class:`FreezeEncoder` freezes when training starts).

    Every group carries ``lr`` (already scaled), ``weight_decay``, ``lr_scale`` (the decay factor)
    and ``layer_id``. Schedulers that multiply each group's initial ``lr``, like MONAI's
    ``WarmupCosineSchedule`` (a ``LambdaLR``), keep the ratios between groups; ones that set one
    absolute value for every group should multiply it by ``lr_scale``.

    Args:
        network: MONAI ``UNETR`` (encoder at ``network.vit``), MONAI ``ViT``, or a module with a ViT
            at ``.vit``; ``DistributedDataParallel`` / ``torch.compile`` wrappers are unwrapped.
        lr: the learning rate of the top layers (decoder, norm), > 0.
        weight_decay: decay of the weight matrices, >= 0. Defaults to 0.05.
        layer_decay: per-layer factor in (0, 1]; 1.0 disables the decay (every group at ``lr``,
            e.g. training from scratch). Defaults to 0.75.
        encoder_lr_scale: factor in (0, 1] on the encoder's rates. Defaults to 1.0.

    Returns:
        A list of ``{"params", "lr", "weight_decay", "lr_scale", "layer_id"}`` dicts, top layers
        first (so ``param_groups[0]`` runs at ``lr`` and loggers reading it show the base rate),
        the decayed group of a layer before its undecayed one; empty groups omitted.

    Raises:
        ValueError: for ``lr <= 0``, ``weight_decay < 0``, ``layer_decay`` outside (0, 1],
            ``layer_decay < 1`` for a network without a ViT encoder, or ``encoder_lr_scale < 1`` for
            a CNN into which no masked-image model was loaded.

    Examples::

        >>> from monai.networks.nets import UNETR
        >>> net = UNETR(1, 5, 32, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=4, qkv_bias=True)  # 12 blocks
        >>> groups = layerwise_lr_groups(net, lr=1e-4, layer_decay=0.75)
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-4)
        >>> groups[0]["lr"], groups[-1]["lr"]  # decoder and norm; patch embedding (0.75 ** 13)
        (0.0001, 2.3757264018058777e-06)
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}.")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}.")
    if not 0.0 < encoder_lr_scale <= 1.0:
        raise ValueError(f"encoder_lr_scale must be in (0, 1], got {encoder_lr_scale!r}.")
    network = unwrap(network)
    if not has_vit(network):
        return _flat_groups(network, lr, weight_decay, layer_decay, encoder_lr_scale)
    vit, _ = find_vit(network, "layerwise_lr_groups")
    encoder = {id(p) for p in encoder_parameters(network)}
    num_layers = len(vit.blocks)
    layer_of: dict[int, int] = {id(p): 0 for p in vit.patch_embedding.parameters()}
    cls_token = getattr(vit, "cls_token", None)
    if isinstance(cls_token, torch.Tensor):
        layer_of[id(cls_token)] = 0
    for i, block in enumerate(vit.blocks):
        layer_of.update({id(p): i + 1 for p in block.parameters()})

    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for name, param in network.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = layer_of.get(id(param), num_layers + 1)
        decay = not no_weight_decay(name, param)
        in_encoder = id(param) in encoder and encoder_lr_scale != 1.0  # one group per layer unless scaled
        key = (layer_id, decay, in_encoder)
        if key not in groups:
            scale = float(layer_decay ** (num_layers + 1 - layer_id)) * (encoder_lr_scale if in_encoder else 1.0)
            groups[key] = {
                "params": [],
                "lr": lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "layer_id": layer_id,
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], k[2], not k[1]))]


def _flat_groups(
    network: nn.Module, lr: float, weight_decay: float, layer_decay: float, encoder_lr_scale: float
) -> list[dict[str, Any]]:
    """One learning rate for a CNN, times ``encoder_lr_scale`` on its pretrained tensors; 1-D parameters not decayed."""
    if layer_decay != 1.0:
        raise ValueError(
            f"layer_decay={layer_decay} and encoder_lr_scale={encoder_lr_scale} need a ViT encoder; "
            f"{type(network).__name__} has none: use layer_decay 1.0."
        )
    pretrained = getattr(network, "pretrained_names", frozenset()) if encoder_lr_scale != 1.0 else frozenset()
    if encoder_lr_scale != 1.0 and not pretrained:
        raise ValueError(
            f"encoder_lr_scale={encoder_lr_scale} lowers the rate of pretrained weights, but no masked-image model "
            f"was loaded into this {type(network).__name__} (pretrained_ckpt is empty?): use encoder_lr_scale 1.0."
        )
    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for name, param in network.named_parameters():
        if not param.requires_grad:
            continue
        key = (name in pretrained, not no_weight_decay(name, param))
        if key not in groups:
            scale = encoder_lr_scale if key[0] else 1.0
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": weight_decay if key[1] else 0.0,
                           "lr_scale": scale, "layer_id": 0}  # fmt: skip
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


class FreezeEncoder:
    """Keep the ViT encoder frozen for the first ``epochs`` epochs, then train everything.

    At the start of each epoch ``e`` (``Events.EPOCH_STARTED``): for ``e <= epochs`` the encoder's
    trainable parameters get ``requires_grad=False`` (only UNETR's decoder, or a ViT's head,
    learns: a warm-up that keeps a pretrained encoder from being disturbed by the gradients of a
    random decoder); from epoch ``epochs + 1`` on they are trainable again. Both changes are
    logged. The decision depends only on the epoch number, so a run resumed from a checkpoint
    (:class:`~monai_mae.engines.AutoResume`) lands in the right phase. Parameters that were not
    trainable to begin with (e.g. a fixed sin-cos table) stay frozen. When training ends while
    frozen (``max_epochs <= epochs``), ``requires_grad`` is restored on completion.

    Build the optimizer before training starts (so it holds the encoder's parameters); frozen
    parameters get no gradient, and AdamW skips them (no update, no weight decay). With
    ``DistributedDataParallel`` use ``find_unused_parameters=True`` while the encoder is frozen.

    Args:
        network: MONAI ``UNETR``, MONAI ``ViT`` or a module with a ViT at ``.vit``.
        epochs: number of epochs with the encoder frozen; 0 disables freezing. Defaults to 0.

    Raises:
        ValueError: for a negative or non-integer ``epochs``, or a network without a ViT.

    Examples::

        >>> from ignite.engine import Engine
        >>> from monai.networks.nets import UNETR
        >>> unetr = UNETR(1, 2, 32, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=4)
        >>> seen = []  # whether the encoder is trainable at each step
        >>> trainer = Engine(lambda engine, batch: seen.append(unetr.vit.norm.weight.requires_grad))
        >>> FreezeEncoder(unetr, epochs=2).attach(trainer)
        >>> _ = trainer.run([0], max_epochs=4)
        >>> seen  # epochs 1-2: decoder only; from epoch 3: everything
        [False, False, True, True]
    """

    def __init__(self, network: nn.Module, epochs: int = 0) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}.")
        if epochs and not has_vit(network):
            raise ValueError(
                f"freeze_encoder_epochs={epochs} needs a ViT encoder to freeze; {type(unwrap(network)).__name__} "
                "has none: use 0."
            )
        self.parameters = encoder_parameters(network) if epochs else []
        self.epochs = epochs
        self.frozen = False
        self._trainable: list[nn.Parameter] = []

    def attach(self, engine: Engine) -> None:
        if self.epochs == 0:
            engine.add_event_handler(Events.EPOCH_STARTED, self._match_ddp)
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self)
        engine.add_event_handler(Events.COMPLETED, self._restore)

    def _match_ddp(self, engine: Engine) -> None:
        """Give the trainer a DDP wrapper that scans for unused parameters exactly while the encoder is frozen."""
        network = getattr(engine, "network", None)
        if isinstance(network, nn.parallel.DistributedDataParallel) and network.find_unused_parameters != self.frozen:
            engine.network = rewrap_ddp(network, find_unused_parameters=self.frozen)
            logger.info(f"FreezeEncoder: DistributedDataParallel find_unused_parameters={self.frozen}.")

    def freeze(self) -> None:
        """Set ``requires_grad=False`` on the encoder's trainable parameters (remembered for :meth:`unfreeze`)."""
        if self.frozen:
            return
        self._trainable = [p for p in self.parameters if p.requires_grad]
        for param in self._trainable:
            param.requires_grad_(False)
        self.frozen = True

    def unfreeze(self) -> None:
        """Make the parameters frozen by :meth:`freeze` trainable again."""
        if not self.frozen:
            return
        for param in self._trainable:
            param.requires_grad_(True)
        self.frozen = False

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if epoch <= self.epochs and not self.frozen:
            self.freeze()
            count = sum(p.numel() for p in self._trainable)
            logger.info(
                f"FreezeEncoder: epoch {epoch}: ViT encoder frozen ({len(self._trainable)} tensors, {count} weights) "
                f"until the end of epoch {self.epochs}; training the rest of the network only."
            )
        elif epoch > self.epochs and self.frozen:
            self.unfreeze()
            logger.info(f"FreezeEncoder: epoch {epoch}: ViT encoder unfrozen, training the whole network.")
        self._match_ddp(engine)

    def _restore(self, engine: Engine) -> None:
        if self.frozen:
            self.unfreeze()
            logger.info("FreezeEncoder: training ended with the encoder frozen; requires_grad restored.")


def load_pretrained(
    network: nn.Module,
    ckpt_path: str | os.PathLike | None,
    strict: bool = True,
    interpolate: bool = True,
    residual_scale: float | str = 1.0,
) -> nn.Module:
    """Load an MAE encoder into ``network`` from ``ckpt_path``, or leave it as built when there is none.

    With an empty or ``None`` path the network is returned untouched and the log says that
    training starts from scratch. Otherwise :func:`~monai_mae.networks.transfer.load_mae_encoder`
    copies the encoder (checking the whole fit before writing) and the transfer report is logged.

    Args:
        network: MONAI ``UNETR``, MONAI ``ViT``, a module with a ViT at ``.vit``, or a CNN of
            :func:`~monai_mae.networks.cnn.cnn_network` (then ``ckpt_path`` is a
            :class:`~monai_mae.networks.mim.MaskedImageModel` of the same architecture, loaded with
            :func:`~monai_mae.networks.mim.load_mim_weights`, and ``residual_scale`` is ignored).
        ckpt_path: MAE weights: ``models/model.pt`` of the ``mae_pretrain`` bundle, one of its
            checkpoints (``{"network": ...}``), or any ``MAEViT`` / ``MaskedAutoEncoderViT`` state
            dict file; ``""`` or ``None`` for training from scratch.
        strict: raise on any misfit (default). False skips tensors that do not fit (see the report).
        interpolate: resample the position table when the patch grids differ. Defaults to True.
        residual_scale: after loading, multiply the encoder's residual stream by this factor with
            :func:`~monai_mae.networks.residual.rescale_residual_stream` (the encoder computes the
            same function; its hidden states, UNETR's skip inputs, scale by the factor). ``"auto"``
            matches the stream's size to the freshly built ``network``'s on a fixed reference batch
            (:func:`~monai_mae.networks.residual.match_residual_stream`); 1.0 (default) leaves the
            weights as loaded. Ignored when training from scratch.

    Returns:
        ``network`` itself (so a bundle can write ``load_pretrained(@network_def, @ckpt).to(@device)``).

    Raises:
        FileNotFoundError: when ``ckpt_path`` does not exist.
        ValueError: when the checkpoint cannot be read or does not fit ``network``; the message names
            the checkpoint and the misfit (e.g. ``hidden width differs: checkpoint has hidden_size=768,
            target has 384``); or when ``residual_scale`` is neither ``"auto"`` nor a positive number.

    Examples::

        >>> from monai.networks.nets import UNETR
        >>> net = UNETR(1, 5, 32, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=4)
        >>> load_pretrained(net, "") is net  # no checkpoint: from scratch, the weights stay as built
        True

    With the model file of the ``mae_pretrain`` bundle::

        unetr = load_pretrained(UNETR(1, 5, 96, qkv_bias=True), "outputs/mae/models/model.pt")
        unetr = load_pretrained(UNETR(1, 5, 96, qkv_bias=True), "mae/models/model.pt", residual_scale="auto")
    """
    auto = isinstance(residual_scale, str) and residual_scale.strip().lower() == "auto"
    if not auto and not is_positive_finite(residual_scale):
        raise ValueError(f"residual_scale must be 'auto' or a positive finite number, got {residual_scale!r}.")
    if ckpt_path is None or not os.fspath(ckpt_path).strip():
        logger.info(f"load_pretrained: no pretrained checkpoint given, training {type(network).__name__} from scratch.")
        return network
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint not found: '{path}' (set pretrained_ckpt to '' to train from scratch)."
        )
    if not has_vit(network):  # a CNN: the same network pretrained by masked-image modelling
        model = read_model(path)
        report = load_mim_weights(network, model.state_dict, model.source)
        logger.info(
            f"load_pretrained: {len(report['loaded'])} tensors of {type(unwrap(network)).__name__} loaded from "
            f"'{path}' (masked-image pretraining); left as built: {report['missing']}."
        )
        return network
    fresh_norm = residual_stream_norm(network) if auto else None
    try:
        report = load_mae_encoder(network, path, strict=strict, interpolate=interpolate, verbose=False)
    except ValueError as err:
        raise ValueError(f"pretrained checkpoint '{path}' does not fit {type(network).__name__}: {err}") from err
    logger.info(f"load_pretrained: MAE encoder loaded from '{path}'.\n{report}")
    if fresh_norm is not None:
        factor = match_residual_stream(network, fresh_norm)
        logger.info(
            f"load_pretrained: residual stream rescaled by {factor:.4g} (mean token norm {fresh_norm / factor:.3g} -> "
            f"{fresh_norm:.3g}, that of the freshly built network); the encoder's output is unchanged."
        )
    elif residual_scale != 1.0:
        rescale_residual_stream(network, float(residual_scale))
        logger.info(
            f"load_pretrained: residual stream rescaled by {float(residual_scale):.4g}; "
            "the encoder's output is unchanged."
        )
    return network


def _to_json(value: Any) -> Any:
    """Metric values as JSON: tensors to numbers or lists, NaN / Inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return _to_json(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def save_metrics_json(engine: Engine, path: str | os.PathLike, **extra: Any) -> Path:
    """Write ``engine.state.metrics`` (and ``extra`` entries) to a JSON file, atomically.

    Tensor metrics become numbers or lists, mapping metrics (e.g. MONAI ``MeanDice`` with
    ``return_with_label``) nested objects, NaN ``null``. The result is also logged.

    Args:
        engine: an evaluator after ``run()``.
        path: the JSON file, e.g. ``{output_dir}/eval/metrics.json``; folders are created.
        extra: more top-level entries (the checkpoint evaluated, the datalist, ...).

    Returns:
        The path written.

    Examples::

        evaluator.run()
        save_metrics_json(evaluator, "outputs/eval/metrics.json", checkpoint="models/model_best.pt")
    """
    content = {"metrics": _to_json(dict(engine.state.metrics)), **_to_json(extra)}
    path = atomic_write(path, lambda f: f.write(json.dumps(content, indent=2) + "\n"), mode="w")
    logger.info(f"save_metrics_json: {json.dumps(content['metrics'])} written to {path}.")
    return path
