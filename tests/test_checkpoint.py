"""Durable checkpoint writes, one read per checkpoint on resume, and "best" meaning lowest for a loss
everywhere it is tracked (evaluator key metric, its log and TensorBoard, BestModelSaver, model_best.pt)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from bundle_utils import REPO
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from test_engines import TINY, _data, _trainer

from monai_mae import MAEViT
from monai_mae.engines import AutoResume, BestModelSaver, EpochCheckpointer
from monai_mae.model_file import read_model
from monai_mae.utils import atomic_write, is_main_process, unwrap


@pytest.fixture
def fsyncs(monkeypatch):
    """Record what ``os.fsync`` is called on: 'file' or 'dir'."""
    seen: list[str] = []
    real = os.fsync

    def record(fd):
        seen.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def test_atomic_write_round_trips_and_syncs_file_then_folder(tmp_path, fsyncs):
    path = atomic_write(tmp_path / "sub" / "x.pt", lambda f: torch.save({"a": torch.arange(3)}, f))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))
    text = atomic_write(tmp_path / "sub" / "m.json", lambda f: f.write('{"dice": 0.5}'), mode="w")
    assert text.read_text() == '{"dice": 0.5}'
    assert fsyncs == ["file", "dir", "file", "dir"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json", "x.pt"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_atomic_write_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def half_then_fail(handle):
        handle.write(b"new but incompl")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_atomic_write_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w', got 'a'"):
        atomic_write(tmp_path / "x", lambda f: None, mode="a")
    with pytest.raises(TypeError, match="write must be callable, got bytes"):
        atomic_write(tmp_path / "x", b"data")


def test_utils_helpers():
    net = torch.nn.Linear(2, 2)
    assert unwrap(torch.nn.DataParallel(net)) is net and is_main_process()


def test_epoch_checkpoints_are_fsynced_and_torn_temporaries_removed(tmp_path, fsyncs):
    torn = tmp_path / ".checkpoint_epoch=3.pt.k2j4h1.tmp"
    tmp_path.mkdir(exist_ok=True)
    torn.write_bytes(b"half")
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    EpochCheckpointer(tmp_path, {"network": net}, n_saved=2).attach(engine)
    engine.run([0], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]
    assert fsyncs == ["file", "dir"] * 3


def test_auto_resume_reads_each_checkpoint_once(tmp_path, monkeypatch):
    net = MAEViT(1, 16, 8, **TINY)
    trainer = _trainer(net, _data(2), max_epochs=2)
    EpochCheckpointer(tmp_path, {"network": net, "trainer": trainer}, n_saved=3).attach(trainer)
    trainer.run()
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"torn")
    loads: list[str] = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(os.path.basename(f)) or real(f, *a, **k))
    trainer2 = _trainer(MAEViT(1, 16, 8, **TINY), _data(2), max_epochs=3)
    resume = AutoResume(tmp_path, {"network": trainer2.network, "trainer": trainer2})
    resume.attach(trainer2)
    trainer2.run()
    assert loads == ["checkpoint_epoch=3.pt", "checkpoint_epoch=2.pt"]
    assert resume.resumed_from == tmp_path / "checkpoint_epoch=2.pt" and trainer2.state.epoch == 3


def test_auto_resume_beyond_max_epochs_is_an_error(tmp_path):
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    EpochCheckpointer(tmp_path, {"network": net, "trainer": engine}).attach(engine)
    engine.run([0], max_epochs=3)
    engine2 = Engine(lambda e, b: None)
    AutoResume(tmp_path, {"network": net, "trainer": engine2}).attach(engine2)
    with pytest.raises(ValueError, match=r"checkpoint_epoch=3.pt is at epoch 3, beyond max_epochs=2"):
        engine2.run([0], max_epochs=2)


class _Scripted(Metric):
    """A metric that returns the next of preset values at each epoch (a validation loss going down)."""

    def __init__(self, values):
        self.values = iter(values)
        super().__init__()

    def reset(self):
        pass

    def update(self, output):
        pass

    def compute(self):
        return next(self.values)


class _Writer:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), int(step)))

    def flush(self):
        pass


def _evaluator(values, net, handlers, metric_cmp_fn=lambda current, best: current < best):
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=[{"image": torch.rand(1, 2), "label": torch.rand(1, 2)}],
        network=net,
        key_val_metric={"val_loss": _Scripted(values)},
        metric_cmp_fn=metric_cmp_fn,
        val_handlers=handlers,
    )


LOSSES = [0.30, 0.2748, 0.28, 0.2163]  # the default (higher is better) would keep epoch 1


def test_lowest_validation_loss_is_the_best_everywhere(tmp_path, caplog):
    net = torch.nn.Linear(2, 2)
    best = BestModelSaver(net, tmp_path / "model_best.pt", metric_name="val_loss", mode="min")
    writer = _Writer()
    stats = StatsHandler(iteration_log=False, name="best_metric_test")
    stats.logger.addHandler(caplog.handler)  # the handler's logger may not propagate to the root
    handlers = [stats, TensorBoardStatsHandler(writer, iteration_log=False,
                state_attributes=["best_metric"]), best]  # fmt: skip
    evaluator = _evaluator(LOSSES, net, handlers)
    try:
        with caplog.at_level(logging.INFO, logger="best_metric_test"):
            for epoch in range(1, 5):
                torch.nn.init.constant_(net.weight, float(epoch))  # the weights tell which epoch was saved
                evaluator.run(global_epoch=epoch)
    finally:
        stats.logger.removeHandler(caplog.handler)
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.2163, 4)
    assert "Key metric: val_loss best value: 0.2163 at epoch: 4" in caplog.text
    assert best.state_dict() == {"best": 0.2163, "best_epoch": 4}
    assert torch.equal(read_model(tmp_path / "model_best.pt").state_dict["weight"], torch.full((2, 2), 4.0))
    assert [v for tag, v, _ in writer.scalars if tag == "best_metric"] == [0.30, 0.2748, 0.2748, 0.2163]

    # after a resume, the evaluator starts from the restored record instead of calling epoch 5 the best
    restored = BestModelSaver(net, tmp_path / "model_best.pt")
    restored.load_state_dict(best.state_dict())
    torch.nn.init.constant_(net.weight, 5.0)
    evaluator2 = _evaluator([0.25], net, [restored])
    evaluator2.run(global_epoch=5)
    assert (evaluator2.state.best_metric, evaluator2.state.best_metric_epoch) == (0.2163, 4)
    assert torch.equal(read_model(tmp_path / "model_best.pt").state_dict["weight"], torch.full((2, 2), 4.0))


def test_best_model_saver_refuses_an_evaluator_ranking_the_other_way(tmp_path):
    from monai.engines.utils import default_metric_cmp_fn

    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"ranks its key metric 'val_loss' higher-is-better \(metric_cmp_fn\)"):
        _evaluator(LOSSES, net, [BestModelSaver(net, tmp_path / "b.pt")], metric_cmp_fn=default_metric_cmp_fn)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'lowest'"):
        BestModelSaver(net, tmp_path / "b.pt", mode="lowest")
    # a Dice-like metric ranked higher-is-better with mode="max" is accepted
    _evaluator(LOSSES, net, [BestModelSaver(net, tmp_path / "b.pt", mode="max")], metric_cmp_fn=default_metric_cmp_fn)


@pytest.mark.parametrize("bundle, metric, mode, lower", [("mae_pretrain", "val_loss", "min", True),
                                                         ("mae_finetune", "val_mean_dice", "max", False)])  # fmt: skip
def test_bundle_configs_rank_the_key_metric_like_best_model_saver(bundle, metric, mode, lower):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    validate = parser["validate"]
    assert list(validate["key_metric"]) == [metric]
    assert validate["best"]["metric_name"] == metric and validate["best"].get("mode", "min") == mode
    if lower:
        assert validate["evaluator"]["metric_cmp_fn"] == "@validate#metric_cmp_fn"
        cmp_fn = parser.get_parsed_content("validate#metric_cmp_fn")
        assert cmp_fn(0.2, 0.3) is True and cmp_fn(0.3, 0.2) is False
    else:
        assert "metric_cmp_fn" not in validate["evaluator"]  # MONAI's default: higher is better
    tensorboard = [
        h for h in validate["handlers"] if isinstance(h, dict) and h["_target_"].endswith("TensorBoardStatsHandler")
    ]
    assert tensorboard[0]["state_attributes"] == ["best_metric"]
