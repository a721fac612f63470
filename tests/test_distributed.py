"""Multi-process training on CPU (gloo): the mae_pretrain bundle's multi_gpu_train.json under torchrun.

One 2-process run of one tiny bundle covers: disjoint data per rank, identical replicas, the lr
scaled by the world size, rank-0-only writing and logging, the datalist checked in shards (each
file read by one rank) with a bad file skipped, and the NaN guard stopping every rank together.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist
from bundle_utils import CPU_ONLY, REPO, TINY_NETWORK, write_overrides
from ignite.engine import Engine, Events
from monai.networks.nets import UNETR

from monai_mae import MAEViT
from monai_mae.data import load_datalist, write_synthetic_dataset
from monai_mae.engines import NonFiniteLossError, NonFiniteLossGuard
from monai_mae.engines.finetune import layerwise_lr_groups
from monai_mae.model_file import read_model

pytestmark = pytest.mark.slow  # every test runs torchrun with 2 processes

TINY_RUN = dict(roi_size=[32, 32, 32], patch_size=[8, 8, 8], batch_size=1, num_samples=2, num_workers=0,
                lr=2e-3, warmup_epochs=1, val_interval=1, progress_bar=False, skip_bad_files=True,
                **TINY_NETWORK, deterministic=True)  # fmt: skip

# Test-only additions, layered last: every rank records the files of each batch it trained on and,
# after training, probes the NaN guard and dumps the files, its weights and its optimizer's base lr.
RECORDER = {
    "seen": "$[]",
    "guard": "$__import__('test_distributed').nan_guard_probe()",  # no '@' here: MONAI parses "import" lines
    "run": [
        "$[handler.attach(@train#trainer) for handler in @train#state_handlers]",
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_STARTED, (lambda seen: lambda engine: "
        "seen.extend((engine.state.epoch, f) for f in engine.state.batch['image'].meta['filename_or_obj']))(@seen))",
        "$@train#trainer.run()",
        "$torch.save({'seen': @seen, 'state': monai_mae.engines.unwrap(@network).state_dict(), "
        "'lr': @optimizer.defaults['lr'], 'world': torch.distributed.get_world_size(), "
        "'guard': @guard}, "
        "os.path.join(@output_dir, 'rank%d.pt' % torch.distributed.get_rank()))",
    ],
}


def nan_guard_probe() -> list[str | None]:
    """Run on every rank after training: the guard on two iterations, where only rank 1's second loss is NaN."""
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.iteration = 2, 7
    guard, messages = NonFiniteLossGuard(), []
    for losses in ((1.0, 2.0), (1.0, float("nan"))):
        engine.state.output = {"loss": torch.tensor(losses[dist.get_rank()])}
        try:
            guard(engine)
            messages.append(None)
        except NonFiniteLossError as err:
            messages.append(str(err))
    return messages


def _torchrun_bundle(
    bundle: str, overrides: Sequence[Path], data: Path, out: Path, *args: str
) -> tuple[str, list[dict]]:
    """Run ``bundle``'s train.json + multi_gpu_train.json + ``overrides`` with ``torchrun`` on 2 CPU processes (gloo).

    Returns:
        the combined stdout and stderr, and the ``rank{0,1}.pt`` records the test recorder wrote to ``out``
        (the processes run in ``out``'s parent folder).
    """
    configs = REPO / "bundles" / bundle / "configs"
    layers = (configs / "train.json", configs / "multi_gpu_train.json", *overrides)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "monai.bundle", "run",
        "--config_file", str([str(f) for f in layers]),
        "--bundle_root", str(configs.parent), "--meta_file", str(configs / "metadata.json"),
        "--logging_file", str(configs / "logging.conf"),
        "--dataset_dir", str(data), "--output_dir", str(out), "--max_epochs", "2", *args,
    ]  # fmt: skip
    path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **CPU_ONLY}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out.parent, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    return log, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_two_process_gloo_run_of_the_bundle(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, num=6, num_validation=1, shape=(40, 40, 32), spacing=(1.5, 1.5, 2.0), seed=3)
    items = load_datalist(data, "training")
    bad, nan_file = Path(items[3]["image"]), Path(items[4]["image"])
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 32, 3), np.int16), np.diag([1.5, 1.5, 2.0, 1.0])), bad)
    volume = nib.load(nan_file)
    values = volume.get_fdata().astype(np.float32)
    values[:2, :2, :2] = np.nan
    nib.save(nib.Nifti1Image(values, volume.affine), nan_file)

    out = tmp_path / "out"
    tiny = write_overrides(tmp_path / "tiny.json", **TINY_RUN)
    recorder = write_overrides(tmp_path / "recorder.json", **RECORDER)
    # --device cpu reaches the config as the string "cpu" (the default is a torch.device)
    log, ranks = _torchrun_bundle("mae_pretrain", (tiny, recorder), data, out, "--device", "cpu")
    assert all(r["world"] == 2 for r in ranks)
    # the datalist was checked in shards: rank 0 read entries 0, 2, 4 (the NaN file, warned about once),
    # rank 1 entries 1, 3 (the 3-channel file), and both ranks dropped entry 3
    assert log.count(f"{nan_file}: 8 NaN and 0 Inf voxels") == 1
    assert log.count(f"skipping datalist entry 3 (skip_bad_files): datalist entry 3 ['image']: {bad}") == 2
    # disjoint shards: per epoch the two ranks trained on different volumes, together on the 4 good ones
    training = {item["image"] for item in items} - {str(bad)}
    for epoch in (1, 2):
        files = [{f for e, f in r["seen"] if e == epoch} for r in ranks]
        assert files[0] and files[1] and not files[0] & files[1], files
        assert files[0] | files[1] == training
    # DDP kept the replicas identical, and rank 0's final model.pt is that model
    final = read_model(out / "models" / "model.pt").state_dict
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
        assert torch.equal(value, final[key]), key
    # lr scaled by the world size (scaled_lr(lr, 1, world_size=2, base_batch=1))
    assert ranks[0]["lr"] == pytest.approx(2 * TINY_RUN["lr"])
    # a NaN on rank 1 alone stops both ranks at the same iteration
    for rank in ranks:
        assert rank["guard"][0] is None
        assert "at epoch 2, iteration 7 on rank(s) [1]; training stopped." in rank["guard"][1]
    # rank-0-only writing and logging
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert not (tmp_path / "runs").exists()  # no stray SummaryWriter on rank 1
    assert log.count("Epoch: 1/2, Iter: 1/2 -- train_loss") == 1  # StatsHandler on rank 0 only
    assert log.count("Metrics -- val_loss") == 2  # one per validation, rank 0 only


# ------------------------------------------------------------------------------------ mae_finetune
def attach_finetune_recorder(trainer, network, optimizer, evaluator, output_dir) -> None:
    """Test-only: every rank records the files it trained on, the encoder and decoder weights at the
    start, after epoch 1 (encoder frozen) and at the end, its lr groups and its validation Dice."""
    from monai_mae.engines import unwrap

    record: dict = {"seen": [], "world": dist.get_world_size()}

    def weights() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in unwrap(network).state_dict().items()}

    def remember(name: str):
        return lambda engine: record.__setitem__(name, weights())

    def finish(engine) -> None:
        record["final"] = weights()
        record["lr"] = optimizer.defaults["lr"]
        record["group_lrs"] = [group["initial_lr"] for group in optimizer.param_groups]
        record["dice"] = float(evaluator.state.metrics["val_mean_dice"])
        torch.save(record, os.path.join(output_dir, f"rank{dist.get_rank()}.pt"))

    trainer.add_event_handler(Events.STARTED, remember("start"))
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), remember("epoch1"))
    trainer.add_event_handler(
        Events.ITERATION_STARTED,
        lambda e: record["seen"].extend((e.state.epoch, f) for f in e.state.batch["image"].meta["filename_or_obj"]),
    )
    trainer.add_event_handler(Events.COMPLETED, finish)


FINETUNE_RECORDER = {
    "recorder": "$__import__('test_distributed')",
    "run": [
        "$[handler.attach(@train#trainer) for handler in @train#state_handlers]",
        "$@recorder.attach_finetune_recorder(@train#trainer, @network, @optimizer, @validate#evaluator, @output_dir)",
        "$@train#trainer.run()",
    ],
}


def test_two_process_gloo_run_of_the_finetune_bundle(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, num=6, num_validation=2, shape=(40, 40, 32), spacing=(1.5, 1.5, 2.0), seed=5)
    mae = MAEViT(1, 32, 16, hidden_size=48, mlp_dim=96, num_layers=12, num_heads=4, qkv_bias=True,
                 decoder_hidden_size=32, decoder_mlp_dim=64, decoder_num_layers=1, decoder_num_heads=4)  # fmt: skip
    torch.save(mae.state_dict(), tmp_path / "mae.pt")

    out = tmp_path / "out"
    tiny = write_overrides(
        tmp_path / "tiny.json", roi_size=[32, 32, 32], batch_size=1, num_samples=1, num_workers=0, lr=1e-3,
        warmup_epochs=1, val_interval=1, sw_batch_size=2, progress_bar=False, freeze_encoder_epochs=1,
        layer_decay=0.75,  # 14 distinct lr groups, to check the world-size scaling of each
        **{"architecture": "unetr", "encoder#hidden_size": 48, "encoder#mlp_dim": 96, "encoder#num_heads": 4,
           "unetr#feature_size": 4},
    )  # fmt: skip
    recorder = write_overrides(tmp_path / "recorder.json", **FINETUNE_RECORDER)
    # --device cpu: on a machine with one GPU, rank 1 would otherwise ask for cuda:1
    ckpt = ("--pretrained_ckpt", str(tmp_path / "mae.pt"), "--device", "cpu")
    log, ranks = _torchrun_bundle("mae_finetune", (tiny, recorder), data, out, *ckpt)
    assert all(r["world"] == 2 for r in ranks)
    # disjoint shards of the 4 labeled training volumes in each epoch
    training = {item["image"] for item in load_datalist(data, "training")}
    for epoch in (1, 2):
        files = [{f for e, f in r["seen"] if e == epoch} for r in ranks]
        assert files[0] and files[1] and not files[0] & files[1], files
        assert files[0] | files[1] == training
    # both ranks started from the MAE encoder; epoch 1 trained the decoder only (frozen encoder under
    # DDP with find_unused_parameters), epoch 2 everything (a new DDP wrapper without the scan); the replicas
    # stayed identical throughout
    mae_state = mae.state_dict()
    for rank in ranks:
        for key, value in rank["start"].items():
            if key.startswith(("vit.blocks.3.attn.qkv.", "vit.blocks.3.norm", "vit.blocks.3.mlp.linear1.")):
                assert torch.equal(value, mae_state[key[len("vit.") :]]), key  # read the stream: not rescaled
    for key in ranks[0]["start"]:
        for stage in ("start", "epoch1", "final"):
            assert torch.equal(ranks[0][stage][key], ranks[1][stage][key]), (stage, key)
    vit_keys = [k for k in ranks[0]["start"] if k.startswith("vit.")]
    decoder_keys = [k for k in ranks[0]["start"] if k.startswith("decoder") or k.startswith("out.")]
    assert all(torch.equal(ranks[0]["epoch1"][k], ranks[0]["start"][k]) for k in vit_keys)
    assert any(not torch.equal(ranks[0]["epoch1"][k], ranks[0]["start"][k]) for k in decoder_keys)
    assert any(not torch.equal(ranks[0]["final"][k], ranks[0]["epoch1"][k]) for k in vit_keys)
    final = read_model(out / "models" / "model.pt").state_dict
    assert all(torch.equal(ranks[0]["final"][k], final[k]) for k in final)
    # lr scaled by the world size in every layer-wise group (the head's group keeps the full lr)
    unetr = UNETR(1, 5, (32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4, qkv_bias=True)
    expected = [group["lr"] for group in layerwise_lr_groups(unetr, 2e-3, 0.05, 0.75)]
    assert len(set(expected)) == 14  # patch embedding, 12 blocks, the rest
    for rank in ranks:
        assert rank["lr"] == pytest.approx(2e-3)
        assert rank["group_lrs"] == pytest.approx(expected)
    # Dice gathered over both ranks' validation shares: the same value everywhere
    assert ranks[0]["dice"] == ranks[1]["dice"]
    # rank-0-only writing and logging
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    assert (out / "models" / "model_best.pt").is_file()
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert not (tmp_path / "runs").exists()
    assert log.count("Epoch: 1/2, Iter: 1/2 -- train_loss") == 1
    assert log.count("Metrics -- ") == 2  # one per validation, rank 0 only
