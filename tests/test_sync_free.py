"""A training step of every network runs without host reads and without data-dependent shapes.

Three independent checks of the same steps (forward, loss, backward):

* on ``device="meta"`` (tensors without values): any ``.item()``, ``bool(tensor)`` or boolean-mask
  index fails there, so running to the end proves there is none;
* a ``TorchDispatchMode`` that counts the ATen ops which read a device value to the host
  (``_local_scalar_dense``, ``item``, ``is_nonzero``) or whose output shape depends on values
  (boolean-mask ``index``/``index_put``, ``nonzero``, ``masked_select``, ``masked_scatter``, ...);
* ``torch._dynamo.explain`` of a training forward + loss: one graph, no graph break.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from monai_mae import (
    MAEViT,
    MaskedReconstructionLoss,
    MaskGenerator,
    content_aware_weights,
    mae_patchify_and_mask,
    patchify,
    random_masking,
    restore_patches,
)
from monai_mae.networks.cnn import CNN_ARCHITECTURES
from monai_mae.networks.encoder import PRIMUS_EXACT
from monai_mae.networks.masking import mask_from_keep, sample_predicted, split_indices
from monai_mae.networks.mim import MaskedImageModel
from monai_mae.networks.vitseg import ViTSeg

aten = torch.ops.aten

TINY = dict(
    hidden_size=48,
    mlp_dim=96,
    num_layers=2,
    num_heads=4,
    decoder_hidden_size=24,
    decoder_mlp_dim=48,
    decoder_num_layers=1,
    decoder_num_heads=4,
)
PRIMUS_BLOCKS = dict(pos_embed_type="rope", mlp_type="swiglu", layer_scale_init=0.1)
MAE_VARIANTS = {
    "default": {},
    "rope_swiglu_layerscale": PRIMUS_BLOCKS,
    "cross_partial": dict(decoder_type="cross", decoder_predict_ratio=0.5),
    "cross_rope_no_cls": dict(decoder_type="cross", decoder_predict_ratio=0.25, cls_token=False, **PRIMUS_BLOCKS),
    "learnable_pos_embed": dict(pos_embed_type="learnable", decoder_pos_embed_type="learnable"),
    "primus_exact": dict(cls_token=False, **PRIMUS_BLOCKS, **PRIMUS_EXACT),
}
VITSEG_VARIANTS = {
    "default": {},
    "rope_swiglu_layerscale": dict(drop_path_rate=0.1, **PRIMUS_BLOCKS),
    "primus_exact": dict(**PRIMUS_BLOCKS, **PRIMUS_EXACT),
    "conv_skips": dict(conv_skips=True),
}

#: ops that copy a device value to the host (a GPU -> CPU synchronisation)
SCALAR_READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero}
#: ops driven by a boolean mask's values or with a value-dependent output shape (a host read on CUDA, a graph
#: break in torch.compile)
DATA_DEPENDENT = {
    aten.nonzero,
    aten.argwhere,
    aten.masked_select,
    aten.masked_scatter,
    aten.masked_scatter_,
    aten.unique_dim,
    aten._unique2,
    aten.unique_consecutive,
}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_, aten._unsafe_index}


class HostReadCounter(TorchDispatchMode):
    """Records every op that reads a tensor value to the host or indexes with a boolean mask."""

    def __init__(self) -> None:
        super().__init__()
        self.scalar_reads: list[str] = []
        self.boolean_masks: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in SCALAR_READS:
            self.scalar_reads.append(str(func))
        elif packet in DATA_DEPENDENT:
            self.boolean_masks.append(str(func))
        elif packet in INDEXING:
            indices = args[1] if len(args) > 1 else (kwargs or {}).get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                self.boolean_masks.append(str(func))
        return func(*args, **(kwargs or {}))


def _mae(device: str = "cpu", **options) -> MAEViT:
    return MAEViT(1, 32, 8, **TINY, **options).to(device).train()


def _vitseg(device: str = "cpu", **options) -> ViTSeg:
    return ViTSeg(1, 3, 32, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, **options).to(device).train()


def _mae_step(net: MAEViT, images: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    loss = MaskedReconstructionLoss(8)(net(images, **forward_kwargs), images)
    loss.backward()
    return loss


def _vitseg_step(net: ViTSeg, images: torch.Tensor) -> torch.Tensor:
    labels = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.long, device=images.device)
    loss = F.cross_entropy(net(images), labels)
    loss.backward()
    return loss


def _trainable_grads(net: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in net.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------- meta device
@pytest.mark.parametrize("options", MAE_VARIANTS.values(), ids=MAE_VARIANTS.keys())
def test_mae_training_step_runs_on_meta(options):
    net = _mae("meta", **options)
    images = torch.empty(2, 1, 32, 32, 32, device="meta")
    loss = _mae_step(net, images)
    assert loss.device.type == "meta" and loss.shape == ()
    grads = _trainable_grads(net)
    assert all(g is not None and g.device.type == "meta" for g in grads)


def test_mae_content_aware_step_runs_on_meta():
    net = _mae("meta")
    images = torch.empty(2, 1, 32, 32, 32, device="meta")
    weights = content_aware_weights(images, 8)  # (B, N) on the device: no value check, no host read
    assert weights.shape == (2, 64)
    _mae_step(net, images, mask_weights=weights)
    assert all(g is not None for g in _trainable_grads(net))


def test_mae_given_cpu_mask_drives_a_meta_network():
    """A given mask is counted on its own device: a CPU mask (MaskGenerator's default) costs the device no read."""
    net = _mae("meta")
    token_mask, _ = MaskGenerator(32, 16, 8, mask_ratio=0.75)(batch_size=2, generator=torch.Generator().manual_seed(0))
    pred, mask = net(torch.empty(2, 1, 32, 32, 32, device="meta"), mask=token_mask)
    assert pred.shape == (2, 64, 512) and mask.device.type == "meta"


@pytest.mark.parametrize("options", VITSEG_VARIANTS.values(), ids=VITSEG_VARIANTS.keys())
def test_vitseg_training_step_runs_on_meta(options):
    net = _vitseg("meta", **options)
    loss = _vitseg_step(net, torch.empty(2, 1, 32, 32, 32, device="meta"))
    assert loss.device.type == "meta"
    assert all(g is not None and g.device.type == "meta" for g in _trainable_grads(net))


# --------------------------------------------------------------------------------------- dispatch-mode count
@pytest.mark.parametrize("options", MAE_VARIANTS.values(), ids=MAE_VARIANTS.keys())
def test_mae_training_step_has_no_host_read(options):
    net = _mae(**options)
    images = torch.rand(2, 1, 32, 32, 32)
    with HostReadCounter() as counter:
        loss = _mae_step(net, images, generator=torch.Generator().manual_seed(0))
    assert (counter.scalar_reads, counter.boolean_masks) == ([], [])
    assert torch.isfinite(loss) and all(g is not None for g in _trainable_grads(net))


@pytest.mark.parametrize("options", VITSEG_VARIANTS.values(), ids=VITSEG_VARIANTS.keys())
def test_vitseg_training_step_has_no_host_read(options):
    net = _vitseg(**options)
    with HostReadCounter() as counter:
        _vitseg_step(net, torch.rand(2, 1, 32, 32, 32))
    assert (counter.scalar_reads, counter.boolean_masks) == ([], [])


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_masking_helpers_have_no_host_read(device):
    images = torch.rand(2, 3, 64, 64).to(device)
    generator = torch.Generator().manual_seed(0) if device == "cpu" else None
    with HostReadCounter() as counter:
        visible, masked_indices, permutation = mae_patchify_and_mask(images, 16, 0.75, generator=generator)
        restored = restore_patches(visible, permutation)
        weights = content_aware_weights(images, 16)
        weighted = random_masking(patchify(images, 16), 0.75, weights=weights, generator=generator, validate=False)
        tokens, voxels = MaskGenerator(32, 16, 8, 0.75, tube_axis=2)(2, generator=generator, device=device)
    assert (counter.scalar_reads, counter.boolean_masks) == ([], [])
    assert (visible.shape, masked_indices.shape, restored.shape) == ((2, 4, 768), (2, 12), (2, 16, 768))
    assert weighted.visible.shape == (2, 4, 768) and (tokens.shape, voxels.shape) == ((2, 64), (2, 32, 32, 32))


def test_counter_sees_what_it_must_refuse():
    """The counter is not blind: the reads this module rules out are all seen."""
    x = torch.rand(2, 8)
    keep = x > 0.5
    with HostReadCounter() as counter:
        x.sum().item()
        bool(x.any())
        x[keep]
        x[keep] = 0.0
        keep.nonzero()
        x.masked_select(keep)
    assert len(counter.scalar_reads) == 2 and len(counter.boolean_masks) == 4


def test_weights_are_checked_on_the_cpu_only_unless_asked():
    tokens, weights = torch.randn(2, 16, 3), torch.rand(2, 16) + 0.1
    with HostReadCounter() as counter:
        random_masking(tokens, 0.75, weights=weights, validate=False)
    assert counter.scalar_reads == []
    with HostReadCounter() as counter:
        random_masking(tokens, 0.75, weights=weights)  # CPU weights: checked by default (no device involved)
    assert counter.scalar_reads != []
    with pytest.raises(ValueError, match="finite and non-negative"):
        random_masking(tokens, 0.75, weights=-weights)
    with pytest.raises(ValueError, match="finite and non-negative"):
        random_masking(tokens, 0.75, weights=torch.full((2, 16), float("nan")), validate=True)
    # validate=False trusts the caller: the draw still has the right shape
    assert random_masking(tokens, 0.75, weights=weights, validate=False).visible.shape == (2, 4, 3)


def test_known_counts_need_no_host_read():
    tokens = torch.randn(3, 16, 2)
    r = random_masking(tokens, 0.75, generator=torch.Generator().manual_seed(1))
    with HostReadCounter() as counter:
        given = mask_from_keep(tokens, r.keep, n_keep=4)
        indices, predicted = sample_predicted(r.mask, 0.5, torch.Generator().manual_seed(2), n_masked=12)
    assert (counter.scalar_reads, counter.boolean_masks) == ([], [])
    assert all(torch.equal(a, b) for a, b in zip(given, r))
    assert torch.equal(indices, sample_predicted(r.mask, 0.5, torch.Generator().manual_seed(2))[0])
    assert indices.shape == (3, 6) and predicted.sum(1).tolist() == [6.0] * 3


def test_multinomial_checks_its_input_on_the_device():
    """``torch.multinomial`` (without replacement) checks its input with ``_assert_async``: a device-side assert
    on CUDA, no host read. Releases before that change read two scalars to the host in every draw."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.multinomial(torch.ones(2, 16), 4, replacement=False)
    assert "aten::_assert_async" in {event.name for event in prof.events()}


# ---------------------------------------------------------------------------------------------- graph breaks
@pytest.mark.parametrize("options", MAE_VARIANTS.values(), ids=MAE_VARIANTS.keys())
def test_mae_training_forward_is_one_graph(options):
    torch._dynamo.reset()
    net = _mae(**options)
    loss_fn = MaskedReconstructionLoss(8)

    def step(images: torch.Tensor) -> torch.Tensor:
        return loss_fn(net(images), images)

    explained = torch._dynamo.explain(step)(torch.rand(2, 1, 32, 32, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_split_indices_equals_boolean_indexing():
    keep = torch.rand(5, 40).argsort(dim=1) < 13  # 13 True per row, at random places
    visible, masked = split_indices(keep, 13)
    index = torch.arange(40).expand(5, 40)
    assert torch.equal(visible, index[keep].view(5, 13)) and torch.equal(masked, index[~keep].view(5, 27))


# ----------------------------------------------------------------------- masked-image models of the CNNs
CNN_OPTIONS = {
    "unet": {"channels": [4, 8], "strides": [2], "num_res_units": 1},
    "dynunet": {"base_filters": 4, "max_filters": 8},
    "segresnet": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
}


def _mim(architecture: str, device: str = "cpu") -> MaskedImageModel:
    return MaskedImageModel(architecture, 1, 32, patch_size=8, options=CNN_OPTIONS[architecture]).to(device).train()


@pytest.mark.parametrize("architecture", CNN_ARCHITECTURES)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_masked_image_model_step_has_no_host_read(architecture, device):
    net = _mim(architecture, device)
    images = torch.rand(2, 1, 32, 32, 32, device=device)
    with HostReadCounter() as counter:
        loss = MaskedReconstructionLoss(8)(net(images), images)
        loss.backward()
    assert (counter.scalar_reads, counter.boolean_masks) == ([], [])
    assert all(g is not None for g in _trainable_grads(net))


def test_masked_image_model_forward_is_one_graph():
    torch._dynamo.reset()
    net = _mim("unet")
    loss_fn = MaskedReconstructionLoss(8)
    explained = torch._dynamo.explain(lambda images: loss_fn(net(images), images))(torch.rand(2, 1, 32, 32, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
