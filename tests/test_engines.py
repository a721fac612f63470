from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.engines import (
    AutoResume,
    BestModelSaver,
    EpochCheckpointer,
    FinalModelSaver,
    GPUAugmentPrepareBatch,
    GradientClipping,
    MAEPrepareBatch,
    NonFiniteLossError,
    NonFiniteLossGuard,
    as_plain_tensor,
    atomic_save,
    build_optimizer,
    list_checkpoints,
    param_groups,
    plain_prepare_batch,
    scaled_lr,
)
from monai_mae.engines.pictures import reconstruction_views
from monai_mae.model_file import read_model

TINY = dict(hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4, decoder_hidden_size=24, decoder_mlp_dim=48,
            decoder_num_layers=1, decoder_num_heads=4)  # fmt: skip


def _trainer(net, data, max_epochs=1, handlers=(), loss=None, **kwargs):
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=data,
        network=net,
        optimizer=build_optimizer(net, lr=1e-3),
        loss_function=loss or MaskedReconstructionLoss(8),
        prepare_batch=MAEPrepareBatch(),
        train_handlers=list(handlers),
        decollate=False,
        **kwargs,
    )


def _data(n=3):
    return [{"image": torch.rand(2, 1, 16, 16, 16)} for _ in range(n)]


def test_prepare_batch_target_is_image_and_seeded_masks():
    images = torch.rand(2, 1, 16, 16, 16)
    inputs, target, args, kwargs = MAEPrepareBatch(seed=5)({"image": images}, device="cpu")
    assert inputs is target and torch.equal(inputs, images) and args == ()
    net = MAEViT(1, 16, 8, **TINY)
    _, m1 = net(inputs, **kwargs)
    _, m2 = net(inputs, **MAEPrepareBatch(seed=5)({"image": images})[3])
    assert torch.equal(m1, m2)
    assert set(MAEPrepareBatch()({"image": images})[3]) == set()
    weights = MAEPrepareBatch(content_aware_strength=2.0, patch_size=8)({"image": images})[3]["mask_weights"]
    assert weights.shape == (2, 8)
    with pytest.raises(ValueError, match="patch_size"):
        MAEPrepareBatch(content_aware_strength=1.0)
    with pytest.raises(ValueError, match="no 'image' entry"):
        MAEPrepareBatch()({"img": images})


def _meta_batch(with_label: bool = True) -> dict:
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))
    batch = {"image": MetaTensor(torch.rand(2, 1, 8, 8, 8), affine=affine)}
    if with_label:
        batch["label"] = MetaTensor(torch.randint(0, 3, (2, 1, 8, 8, 8)).float(), affine=affine)
    return batch


@pytest.mark.parametrize(
    "hook",
    [MAEPrepareBatch(), MAEPrepareBatch(seed=1), plain_prepare_batch, GPUAugmentPrepareBatch(flip_prob=1.0),
     GPUAugmentPrepareBatch(MAEPrepareBatch(), intensity_shift=0.1)],
    ids=["mae", "mae-seeded", "supervised", "gpu-augment", "gpu-augment-mae"],
)  # fmt: skip
def test_prepare_batch_hooks_give_the_network_plain_tensors(hook):
    """MetaTensors from the loader reach the network as plain tensors with the same values (no metadata cost)."""
    batch = _meta_batch()
    inputs, targets = hook(batch, torch.device("cpu"))[:2]
    assert type(inputs) is torch.Tensor and type(targets) is torch.Tensor
    assert inputs.shape == (2, 1, 8, 8, 8)
    if isinstance(hook, MAEPrepareBatch):
        assert torch.equal(inputs, batch["image"].as_tensor())
    if hook is plain_prepare_batch:
        assert torch.equal(inputs, batch["image"].as_tensor()) and torch.equal(targets, batch["label"].as_tensor())
    assert isinstance(batch["image"], MetaTensor) and batch["image"].affine[0, 0] == 1.5  # the batch keeps its metadata


def test_as_plain_tensor_converts_nested_containers_and_keeps_the_rest():
    image = MetaTensor(torch.ones(2, 2))
    out = as_plain_tensor({"a": image, "b": [image, (image, 3)], "c": "text"})
    assert type(out["a"]) is torch.Tensor and out["a"].data_ptr() == image.data_ptr()  # no copy
    assert type(out["b"][0]) is torch.Tensor and type(out["b"][1][0]) is torch.Tensor and out["b"][1][1] == 3
    assert out["c"] == "text" and isinstance(out["b"][1], tuple)


def test_param_groups_and_optimizer():
    net = MAEViT(1, 16, 8, **TINY)
    decay, no_decay = param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    assert all(p.ndim == 2 or p.ndim == 5 for p in decay["params"])
    assert any(names[id(p)] == "cls_token" for p in no_decay["params"])
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    grouped = {names[id(p)] for g in (decay, no_decay) for p in g["params"]}
    assert "patch_embedding.position_embeddings" in frozen and not set(frozen) & grouped
    opt = build_optimizer(net, lr=2e-4)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.param_groups[0]["lr"] == 2e-4


def test_scaled_lr():
    assert scaled_lr(1.5e-4, 64, world_size=4) == pytest.approx(1.5e-4)
    assert scaled_lr(1e-4, 2, world_size=8, base_batch=2) == pytest.approx(8e-4)
    with pytest.raises(ValueError, match="world_size=0"):
        scaled_lr(1e-4, 2, world_size=0)


def test_atomic_save_leaves_no_temporary(tmp_path):
    path = atomic_save({"a": torch.ones(3)}, tmp_path / "sub" / "x.pt")
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]


def test_checkpoint_resume_round_trip(tmp_path, caplog):
    torch.manual_seed(0)
    net = MAEViT(1, 16, 8, **TINY)
    trainer = _trainer(net, _data(), max_epochs=2)
    saver = EpochCheckpointer(tmp_path, {"network": net, "optimizer": trainer.optimizer, "trainer": trainer}, n_saved=2)
    saver.attach(trainer)
    trainer.run()
    assert [e for e, _ in list_checkpoints(tmp_path)] == [2, 1]
    saved = {k: v.clone() for k, v in net.state_dict().items()}

    net2 = MAEViT(1, 16, 8, **TINY)
    trainer2 = _trainer(net2, _data(), max_epochs=3)
    epochs_run = []
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    resume = AutoResume(tmp_path, {"network": net2, "optimizer": trainer2.optimizer, "trainer": trainer2})
    resume.attach(trainer2)
    loaded = {}
    trainer2.add_event_handler(
        Events.STARTED, lambda e: loaded.update({k: v.clone() for k, v in net2.state_dict().items()})
    )
    with caplog.at_level(logging.INFO):
        trainer2.run()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())  # the weights of epoch 2 were restored
    assert resume.resumed_from == tmp_path / "checkpoint_epoch=2.pt"
    assert epochs_run == [3] and trainer2.state.iteration == 9
    assert "resumed from" in caplog.text


def test_auto_resume_skips_corrupt_newest(tmp_path, caplog):
    net = MAEViT(1, 16, 8, **TINY)
    trainer = _trainer(net, _data(2), max_epochs=1)
    EpochCheckpointer(tmp_path, {"network": net, "trainer": trainer}).attach(trainer)
    trainer.run()
    good = list_checkpoints(tmp_path)[0][1]
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(good.read_bytes()[:100])  # torn write
    trainer2 = _trainer(MAEViT(1, 16, 8, **TINY), _data(2), max_epochs=2)
    resume = AutoResume(tmp_path, {"network": trainer2.network, "trainer": trainer2})
    resume.attach(trainer2)
    with caplog.at_level(logging.WARNING):
        trainer2.run()
    assert resume.resumed_from == good
    assert "skipping unreadable checkpoint" in caplog.text and "checkpoint_epoch=2.pt" in caplog.text


def test_non_finite_loss_stops_before_the_step(tmp_path):
    net = MAEViT(1, 16, 8, **TINY)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def nan_loss(outputs, images):
        return MaskedReconstructionLoss(8)(outputs, images) * float("nan")

    trainer = _trainer(net, _data(), loss=nan_loss, handlers=[NonFiniteLossGuard(tmp_path)])
    with pytest.raises(NonFiniteLossError, match="epoch 1, iteration 1"):
        trainer.run()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gradient_clipping():
    net = MAEViT(1, 16, 8, **TINY)
    norms = []
    trainer = _trainer(
        net,
        _data(1),
        handlers=[GradientClipping(max_norm=1e-3)],
        loss=lambda o, t: 1e3 * MaskedReconstructionLoss(8)(o, t),
    )
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED,
        lambda e: norms.append(
            math.sqrt(sum(float(p.grad.pow(2).sum()) for p in net.parameters() if p.grad is not None))
        ),
    )
    trainer.run()
    assert norms[0] == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipping(0.0)


def test_best_and_final_model_savers(tmp_path):
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    best = BestModelSaver(net, tmp_path / "best.pt")
    values = iter([0.5, 0.7, 0.3])
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_loss=next(values)))
    best.attach(engine)
    FinalModelSaver(net, tmp_path / "final.pt").attach(engine)
    engine.run([0], max_epochs=3)
    assert best.state_dict() == {"best": 0.3, "best_epoch": 3}
    assert set(read_model(tmp_path / "best.pt").state_dict) == {"weight", "bias"}
    assert (tmp_path / "final.pt").exists()
    restored = BestModelSaver(net, tmp_path / "b2.pt")
    restored.load_state_dict(best.state_dict())
    assert restored.best == 0.3


def test_final_model_not_written_when_terminated(tmp_path):
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: e.terminate())
    FinalModelSaver(net, tmp_path / "final.pt").attach(engine)
    engine.run([0, 1], max_epochs=2)
    assert not (tmp_path / "final.pt").exists()


@pytest.mark.parametrize("shape, patch, views", [((1, 1, 16, 12, 8), (8, 4, 4), [(12, 16), (8, 16), (8, 12)]),
                                                 ((1, 1, 16, 24), (8, 8), [(24, 16)])])  # fmt: skip
def test_reconstruction_views(shape, patch, views):
    images = torch.rand(shape)
    from monai_mae import patchify

    target = patchify(images, patch)
    mask = torch.zeros(target.shape[:2])
    mask[:, ::2] = 1
    rows = reconstruction_views(images, target, mask, patch)
    assert [row[0].shape for row in rows] == views and all(len(row) == 4 for row in rows)
    # a perfect prediction: both reconstruction columns equal the input column
    for row in rows:
        assert np.allclose(row[2], row[0]) and np.allclose(row[3], row[0])
    masked = [row for row in rows if not np.array_equal(row[1], row[0])]  # filled with the input's minimum
    assert masked and all(np.isclose(row[1], images.min().item()).any() for row in masked)
    volume = images[0, 0].numpy()
    first = volume[:, :, shape[-1] // 2].T if len(shape) == 5 else volume.T  # axial: rows y, columns x
    assert np.array_equal(rows[0][0], first)
