"""What ``DistributedDataParallel`` needs from the networks and the engines: no parameter that the forward pass
never uses, the unused-parameter scan only while part of the network is frozen, and no gradient all-reduce on
the micro-steps of gradient accumulation.

* :func:`freeze_unused_parameters`: MONAI's ``TransformerBlock`` always builds a trainable ``norm_cross_attn``
  that only a block with cross-attention uses. DDP without ``find_unused_parameters`` waits for its gradient
  and stops at the second iteration ("Expected to have finished reduction in the prior iteration"); the
  bundles freeze it when they build a network.
* :func:`rewrap_ddp`: DDP fixes ``find_unused_parameters`` when it is built (changing the attribute later
  breaks its reducer), so :class:`~monai_mae.engines.finetune.FreezeEncoder` builds a new wrapper around the
  same module when the encoder is frozen or unfrozen: the graph scan costs time only while it is needed.
* :class:`AccumulationNoSync`: with ``accumulation_steps > 1`` the micro-steps that do not step the optimizer
  skip DDP's all-reduce (what ``DistributedDataParallel.no_sync`` does), so gradients are reduced once per
  optimizer step.
"""

from __future__ import annotations

import logging

import torch.nn as nn
from ignite.engine import Engine, Events
from monai.networks.blocks.transformerblock import TransformerBlock

__all__ = ["AccumulationNoSync", "freeze_unused_parameters", "optimizer_steps_now", "rewrap_ddp"]

logger = logging.getLogger(__name__)


def freeze_unused_parameters(network: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on the parameters that ``network``'s forward pass never uses.

    These are the cross-attention norms (``norm_cross_attn``) of MONAI ``TransformerBlock``s built without
    cross-attention (MONAI's ``UNETR``, ``ViT``, the blocks of ``MAEViT``). The weights stay in the state
    dict, so checkpoints keep MONAI's layout. Build the optimizer afterwards: frozen parameters are left out.

    Args:
        network: any module (a DDP or ``torch.compile`` wrapper is searched through as well).

    Returns:
        ``network`` itself, so a bundle writes ``freeze_unused_parameters(@network_def).to(@device)``.

    Examples::

        >>> from monai.networks.nets import UNETR
        >>> unetr = freeze_unused_parameters(UNETR(1, 2, 32, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=4))
        >>> unetr.vit.blocks[0].norm_cross_attn.weight.requires_grad, unetr.vit.blocks[0].norm1.weight.requires_grad
        (False, True)
    """
    for module in network.modules():
        if isinstance(module, TransformerBlock) and not module.with_cross_attention:
            module.norm_cross_attn.requires_grad_(False)
    return network


def rewrap_ddp(ddp: nn.parallel.DistributedDataParallel, find_unused_parameters: bool) -> nn.Module:
    """A new ``DistributedDataParallel`` around ``ddp.module`` with ``find_unused_parameters`` set as asked.

    The device ids, output device, process group, bucket size, buffer broadcast and gradient-as-bucket-view
    settings are kept; the module, and so the parameters an optimizer holds, are the same objects. Building
    the wrapper broadcasts rank 0's weights (they are equal on every rank already). The old wrapper's
    gradient hooks stay registered but do nothing once its ``forward`` is no longer called.

    Args:
        ddp: the wrapper in use.
        find_unused_parameters: the new wrapper's setting.

    Returns:
        ``ddp`` itself when it already has that setting, else the new wrapper.
    """
    if ddp.find_unused_parameters == bool(find_unused_parameters):
        return ddp
    return nn.parallel.DistributedDataParallel(
        ddp.module,
        device_ids=ddp.device_ids,
        output_device=ddp.output_device,
        broadcast_buffers=ddp.broadcast_buffers,
        process_group=ddp.process_group,
        bucket_cap_mb=ddp.bucket_bytes_cap / (1024 * 1024),
        find_unused_parameters=bool(find_unused_parameters),
        gradient_as_bucket_view=ddp.gradient_as_bucket_view,
    )


def optimizer_steps_now(engine: Engine) -> bool:
    """Whether the optimizer steps on the current iteration of ``engine`` (MONAI's ``SupervisedTrainer`` rule).

    With ``accumulation_steps`` ``a > 1`` it steps after every ``a``-th iteration of an epoch and after the
    epoch's last one; with ``a = 1`` after every iteration.
    """
    acc = getattr(engine, "accumulation_steps", 1)
    if acc <= 1:
        return True
    length = engine.state.epoch_length
    local = (engine.state.iteration - 1) % length if length else engine.state.iteration - 1
    return (local + 1) % acc == 0 or (length is not None and local + 1 == length)


class AccumulationNoSync:
    """Skip DDP's gradient all-reduce on the accumulation micro-steps of a ``SupervisedTrainer``.

    Before each iteration (``Events.ITERATION_STARTED``) sets the trainer's DDP network's
    ``require_backward_grad_sync`` to whether the optimizer steps on this iteration
    (:func:`optimizer_steps_now`): the flag that ``DistributedDataParallel.no_sync()`` clears, read by DDP's
    ``forward``. The gradients of the skipped micro-steps add up locally and are all-reduced, summed over
    the micro-steps, with the last one: the same result with ``1 / accumulation_steps`` of the traffic.
    Does nothing without accumulation or when the network is not a DDP wrapper.
    """

    def attach(self, engine: Engine) -> None:
        if getattr(engine, "accumulation_steps", 1) > 1:
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        network = engine.network
        while hasattr(network, "_orig_mod"):  # torch.compile around the DDP wrapper
            network = network._orig_mod
        if isinstance(network, nn.parallel.DistributedDataParallel):
            network.require_backward_grad_sync = optimizer_steps_now(engine)
