"""Unit tests of ``monai_mae.engines.finetune``: layer-wise lr groups, encoder freezing, pretrained loading."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from monai.networks import eval_mode
from monai.networks.nets import UNETR, ViT
from monai.optimizers import WarmupCosineSchedule

from monai_mae import MAEViT
from monai_mae.engines.finetune import (
    FreezeEncoder,
    encoder_parameters,
    layerwise_lr_groups,
    load_pretrained,
    save_metrics_json,
)
from monai_mae.networks.residual import residual_stream_norm

TINY = dict(hidden_size=48, mlp_dim=96, num_heads=4, qkv_bias=True)  # UNETR fixes 12 layers and patch 16


def _unetr(**kwargs) -> UNETR:
    return UNETR(1, 3, (32, 32, 32), feature_size=4, **{**TINY, **kwargs})


def _lr_by_name(network: torch.nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    """``name -> (lr, weight_decay)`` of every parameter, checking each is in exactly one group."""
    where = {}
    for group in groups:
        for param in group["params"]:
            assert id(param) not in where, "parameter in two groups"
            where[id(param)] = (group["lr"], group["weight_decay"])
    return {name: where[id(p)] for name, p in network.named_parameters() if id(p) in where}


@pytest.mark.parametrize("layer_decay", [0.75, 0.5, 1.0])
def test_layerwise_lrs_per_block_for_unetr(layer_decay):
    net, lr = _unetr(), 1e-3
    lrs = _lr_by_name(net, layerwise_lr_groups(net, lr, weight_decay=0.05, layer_decay=layer_decay))
    assert set(lrs) == {name for name, p in net.named_parameters() if p.requires_grad}
    for name, (value, _) in lrs.items():
        if name.startswith("vit.patch_embedding."):
            expected = lr * layer_decay**13
        elif name.startswith("vit.blocks."):
            expected = lr * layer_decay ** (12 - int(name.split(".")[2]))
        else:  # vit.norm and the convolutional decoder
            expected = lr
        assert value == pytest.approx(expected, rel=1e-12), name
    assert lrs["vit.blocks.11.mlp.linear1.weight"][0] == pytest.approx(lr * layer_decay)
    assert lrs["vit.norm.weight"][0] == lrs["decoder2.transp_conv.conv.weight"][0] == lr


def test_weight_decay_only_on_matrices_and_kernels():
    net = _unetr()
    lrs = _lr_by_name(net, layerwise_lr_groups(net, 1e-3, weight_decay=0.1))
    params = dict(net.named_parameters())
    for name, (_, decay) in lrs.items():
        no_decay = params[name].ndim <= 1 or "position_embeddings" in name
        assert decay == (0.0 if no_decay else 0.1), name
    assert lrs["vit.patch_embedding.position_embeddings"][1] == 0.0


def test_groups_carry_lr_scale_and_top_group_first():
    groups = layerwise_lr_groups(_unetr(), 2e-4, layer_decay=0.8)
    for group in groups:
        assert group["lr"] == pytest.approx(2e-4 * group["lr_scale"])
        assert group["lr_scale"] == pytest.approx(0.8 ** (13 - group["layer_id"]))
    assert groups[0]["lr_scale"] == 1.0 and groups[-1]["layer_id"] == 0


def test_warmup_cosine_schedule_keeps_the_ratios():
    groups = layerwise_lr_groups(_unetr(), 1e-3, layer_decay=0.75)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=3, t_total=20)
    for _ in range(10):  # through the warm-up into the cosine decay
        optimizer.step()
        scheduler.step()
        base = [g["lr"] / g["lr_scale"] for g in optimizer.param_groups]
        assert base == pytest.approx([base[0]] * len(base), rel=1e-9)
    assert 0 < base[0] < 1e-3


def test_vit_with_head_and_fixed_table():
    vit = ViT(1, (32, 32, 32), 16, hidden_size=48, mlp_dim=96, num_layers=3, num_heads=4, classification=True,
              pos_embed_type="sincos")  # fmt: skip
    lrs = _lr_by_name(vit, layerwise_lr_groups(vit, 1.0, layer_decay=0.5))
    assert "patch_embedding.position_embeddings" not in lrs  # fixed sin-cos table: not trainable, left out
    assert lrs["cls_token"] == (0.5**4, 0.0) and lrs["blocks.0.attn.qkv.weight"][0] == 0.5**3
    assert lrs["blocks.2.norm1.weight"][0] == 0.5 and lrs["classification_head.0.weight"][0] == 1.0
    assert {id(p) for p in encoder_parameters(vit)}.isdisjoint({id(p) for p in vit.classification_head.parameters()})


@pytest.mark.parametrize(
    "kwargs, match",
    [({"lr": 0.0}, "lr must be > 0, got 0.0"), ({"layer_decay": 1.5}, r"layer_decay must be in \(0, 1\], got 1.5"),
     ({"layer_decay": 0.0}, "layer_decay must be in"), ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1")],
)  # fmt: skip
def test_layerwise_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layerwise_lr_groups(_unetr(), **{"lr": 1e-3, **kwargs})


def test_no_vit_is_a_value_error():
    with pytest.raises(ValueError, match="encoder_lr_scale=1.0 need a ViT encoder; Linear has none"):
        layerwise_lr_groups(torch.nn.Linear(2, 2), 1e-3)
    with pytest.raises(ValueError, match="freeze_encoder_epochs=1 needs a ViT encoder to freeze; Conv3d has none"):
        FreezeEncoder(torch.nn.Conv3d(1, 1, 1), epochs=1)


def _record_requires_grad(
    net: UNETR, freeze_epochs: int, max_epochs: int, start_epoch: int = 0
) -> list[tuple[bool, bool]]:
    """(encoder trainable, decoder trainable) seen by the process function in each epoch."""
    seen = []
    engine = Engine(
        lambda e, b: seen.append(
            (net.vit.blocks[0].attn.qkv.weight.requires_grad, net.out.conv.conv.weight.requires_grad)
        )
    )
    FreezeEncoder(net, epochs=freeze_epochs).attach(engine)
    if start_epoch:  # as after AutoResume
        engine.load_state_dict({"epoch": start_epoch, "max_epochs": max_epochs, "epoch_length": 1})
    engine.run([0], max_epochs=max_epochs)
    return seen


def test_freeze_then_unfreeze_by_epoch(caplog):
    net = _unetr()
    with caplog.at_level(logging.INFO, logger="monai_mae.engines.finetune"):
        seen = _record_requires_grad(net, freeze_epochs=2, max_epochs=4)
    assert seen == [(False, True), (False, True), (True, True), (True, True)]
    assert "epoch 1: ViT encoder frozen" in caplog.text and "until the end of epoch 2" in caplog.text
    assert "epoch 3: ViT encoder unfrozen" in caplog.text
    assert all(p.requires_grad for p in net.parameters())


def test_freeze_resumed_run_and_restore_at_end():
    assert _record_requires_grad(_unetr(), freeze_epochs=2, max_epochs=4, start_epoch=2) == [(True, True), (True, True)]
    net = _unetr()
    assert _record_requires_grad(net, freeze_epochs=5, max_epochs=2) == [(False, True), (False, True)]
    assert all(p.requires_grad for p in net.parameters())  # restored on completion
    assert _record_requires_grad(_unetr(), freeze_epochs=0, max_epochs=2) == [(True, True), (True, True)]


def test_unfreeze_keeps_fixed_tables_fixed():
    vit = ViT(1, 32, 16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, pos_embed_type="sincos")
    freezer = FreezeEncoder(vit, epochs=1)
    freezer.freeze()
    assert not any(p.requires_grad for p in vit.parameters())
    freezer.unfreeze()
    assert not vit.patch_embedding.position_embeddings.requires_grad
    assert vit.blocks[0].attn.qkv.weight.requires_grad


@pytest.mark.parametrize("epochs", [-1, 1.5, True])
def test_freeze_bad_epochs(epochs):
    with pytest.raises(ValueError, match=f"epochs must be an int >= 0, got {epochs!r}"):
        FreezeEncoder(_unetr(), epochs=epochs)


def test_frozen_encoder_does_not_move_in_training():
    """Two epochs with SupervisedTrainer and AdamW (weight decay): epoch 1 frozen, epoch 2 not."""
    torch.manual_seed(0)
    net = _unetr()
    data = [{"image": torch.rand(1, 1, 32, 32, 32), "label": torch.randint(0, 3, (1, 1, 32, 32, 32)).float()}]
    snapshots = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=data, network=net,
        optimizer=torch.optim.AdamW(layerwise_lr_groups(net, 1e-2, weight_decay=0.5), lr=1e-2),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True), decollate=False,
        train_handlers=[FreezeEncoder(net, epochs=1)],
    )  # fmt: skip
    snap = lambda: (net.vit.blocks[3].mlp.linear1.weight.clone(), net.out.conv.conv.weight.clone())  # noqa: E731
    snapshots.append(snap())
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: snapshots.append(snap()))
    trainer.run()
    (enc0, dec0), (enc1, dec1), (enc2, _) = snapshots
    assert torch.equal(enc0, enc1) and not torch.equal(dec0, dec1)  # frozen: only the decoder learned
    assert not torch.equal(enc1, enc2)  # unfrozen in epoch 2


def _tiny_mae(**kwargs) -> MAEViT:
    return MAEViT(1, 32, 16, mlp_dim=96, num_layers=12, num_heads=4, qkv_bias=True, decoder_hidden_size=32,
                  decoder_mlp_dim=64, decoder_num_layers=1, decoder_num_heads=4, **{"hidden_size": 48, **kwargs})  # fmt: skip


@pytest.mark.parametrize("path", ["", None, "  "])
def test_load_pretrained_from_scratch_is_a_no_op(path, caplog):
    net = _unetr()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="monai_mae.engines.finetune"):
        assert load_pretrained(net, path) is net
    assert "training UNETR from scratch" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_load_pretrained_copies_the_encoder(tmp_path, caplog):
    mae = _tiny_mae()
    torch.save({"network": mae.state_dict()}, tmp_path / "ckpt.pt")  # a bundle checkpoint: nested weights
    net = _unetr()
    with caplog.at_level(logging.INFO, logger="monai_mae.engines.finetune"):
        assert load_pretrained(net, tmp_path / "ckpt.pt") is net
    assert "MAE encoder transfer: 173 tensors loaded" in caplog.text and str(tmp_path / "ckpt.pt") in caplog.text
    assert torch.equal(net.vit.blocks[5].attn.qkv.weight, mae.blocks[5].attn.qkv.weight)
    assert torch.equal(net.vit.patch_embedding.position_embeddings, mae.patch_embedding.position_embeddings)


def test_load_pretrained_errors(tmp_path):
    torch.save(_tiny_mae(hidden_size=96).state_dict(), tmp_path / "wide.pt")
    net = _unetr()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"wide.pt' does not fit UNETR: .*checkpoint has hidden_size=96, target has 48"
    ):
        load_pretrained(net, tmp_path / "wide.pt")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing written
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_pretrained(net, tmp_path / "missing.pt")


def test_load_pretrained_residual_scale(tmp_path, caplog):
    mae = _tiny_mae()
    torch.save(mae.state_dict(), tmp_path / "mae.pt")
    x = torch.rand(1, 1, 32, 32, 32)
    plain = load_pretrained(_unetr(), tmp_path / "mae.pt")
    with eval_mode(plain):
        out_plain, hidden_plain = plain.vit(x)

    halved = load_pretrained(_unetr(), tmp_path / "mae.pt", residual_scale=0.5)
    with eval_mode(halved):
        out, hidden = halved.vit(x)
    torch.testing.assert_close(out, out_plain, atol=1e-4, rtol=1e-3)  # up to LayerNorm eps
    torch.testing.assert_close(hidden[3], 0.5 * hidden_plain[3], atol=1e-4, rtol=1e-3)

    torch.manual_seed(0)
    fresh_norm = residual_stream_norm(_unetr())
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="monai_mae.engines.finetune"):
        auto = load_pretrained(_unetr(), tmp_path / "mae.pt", residual_scale="auto")
    assert residual_stream_norm(auto) == pytest.approx(fresh_norm, rel=1e-4)  # the size of a fresh network's stream
    assert "residual stream rescaled by" in caplog.text
    with eval_mode(auto):
        torch.testing.assert_close(auto.vit(x)[0], out_plain, atol=1e-4, rtol=1e-3)

    before = {k: v.clone() for k, v in plain.state_dict().items()}
    for bad in (0, -2.0, "half", float("nan"), None):
        with pytest.raises(ValueError, match="residual_scale must be 'auto' or a positive finite number"):
            load_pretrained(plain, tmp_path / "mae.pt", residual_scale=bad)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())  # checked before loading


def test_save_metrics_json(tmp_path):
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"val_mean_dice": 0.5, "per_class": {"a": torch.tensor(0.25), "b": float("nan")},
                            "raw": torch.tensor([0.1, 0.2])}  # fmt: skip
    path = save_metrics_json(engine, tmp_path / "eval" / "metrics.json", checkpoint="model_best.pt")
    assert json.loads(path.read_text()) == {
        "metrics": {"val_mean_dice": 0.5, "per_class": {"a": 0.25, "b": None}, "raw": pytest.approx([0.1, 0.2])},
        "checkpoint": "model_best.pt",
    }
