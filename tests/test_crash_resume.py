"""Never lose work: a pretraining run killed with SIGKILL resumes from its last checkpoint, a NaN loss
stops the run without touching the last good checkpoint, and checkpoints left by a killed run are
rotated and cleaned by the next one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from bundle_utils import CPU_ONLY, REPO, TINY_NETWORK, run_bundle, write_overrides
from monai.engines import SupervisedTrainer

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.data import write_synthetic_dataset
from monai_mae.engines import AutoResume, EpochCheckpointer, MAEPrepareBatch, build_optimizer, list_checkpoints

TINY_RUN = dict(roi_size=[32, 32, 32], patch_size=[8, 8, 8], batch_size=2, num_samples=2, num_workers=0,
                lr=2e-3, warmup_epochs=1, val_interval=1, progress_bar=False, deterministic=True,
                **TINY_NETWORK)  # fmt: skip
MAX_EPOCHS = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_synthetic_dataset(root, num=4, num_validation=1, shape=(40, 40, 32), spacing=(1.5, 1.5, 2.0), seed=2)
    return root


def _bundle_cmd(overrides, dataset, out, max_epochs=MAX_EPOCHS) -> list[str]:
    configs = REPO / "bundles" / "mae_pretrain" / "configs"
    return [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str([str(configs / "train.json"), str(overrides)]),
        "--bundle_root", str(REPO / "bundles" / "mae_pretrain"), "--meta_file", str(configs / "metadata.json"),
        "--logging_file", str(configs / "logging.conf"),
        "--dataset_dir", str(dataset), "--output_dir", str(out), "--max_epochs", str(max_epochs),
    ]  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_same_command_resumes(dataset, tmp_path):
    out = tmp_path / "out"
    overrides = write_overrides(tmp_path / "tiny.json", **TINY_RUN)
    cmd = _bundle_cmd(overrides, dataset, out)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **CPU_ONLY}
    first = out / "checkpoints" / "checkpoint_epoch=1.pt"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            deadline = time.monotonic() + 240
            while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert first.exists(), (tmp_path / "killed.log").read_text()[-3000:]
            running = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    assert running, "the run ended before it could be killed; raise MAX_EPOCHS"
    saved = [epoch for epoch, _ in list_checkpoints(out / "checkpoints")]
    assert saved and max(saved) < MAX_EPOCHS and not (out / "models" / "model.pt").exists()
    last = max(saved)

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    resumed = re.search(r"resumed from \S*checkpoint_epoch=(\d+)\.pt", second.stdout)
    assert resumed and int(resumed.group(1)) == last, second.stdout[-3000:]
    assert "Epoch[1] Complete" not in second.stdout and f"Epoch[{last}] Complete" not in second.stdout
    assert f"Epoch[{last + 1}] Complete" in second.stdout and f"Epoch[{MAX_EPOCHS}] Complete" in second.stdout
    assert (out / "models" / "model.pt").exists()
    # n_saved=2 holds across the restart: the killed run's older checkpoints were rotated out
    assert [epoch for epoch, _ in list_checkpoints(out / "checkpoints")] == [MAX_EPOCHS, MAX_EPOCHS - 1]
    state = torch.load(out / "checkpoints" / f"checkpoint_epoch={MAX_EPOCHS}.pt", weights_only=True)
    assert state["trainer"]["iteration"] == MAX_EPOCHS * state["trainer"]["epoch_length"]


# the training loss (not the validation metric) turns NaN from its 4th call on: epoch 2, iteration 4
NAN_LOSS = "$(lambda loss, calls=[0]: lambda outputs, images: (calls.__setitem__(0, calls[0] + 1), loss(outputs, images) * (float('nan') if calls[0] >= 4 else 1.0))[1])(@loss)"  # noqa: E501


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    out = tmp_path / "out"
    overrides = write_overrides(
        tmp_path / "nan.json", **{**TINY_RUN, "batch_size": 1, "train#trainer#loss_function": NAN_LOSS}
    )
    args = ("--dataset_dir", str(dataset), "--output_dir", str(out), "--max_epochs", "4")
    result = run_bundle("mae_pretrain", "train.json", overrides, *args, check=False)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    good = out / "checkpoints" / "checkpoint_epoch=1.pt"
    assert "NonFiniteLossError: non-finite training loss (nan) at epoch 2, iteration 4; training stopped." in log, log[
        -3000:
    ]
    assert f"The last good checkpoint is {good}" in log
    assert [epoch for epoch, _ in list_checkpoints(out / "checkpoints")] == [1]
    state = torch.load(good, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["network"].values() if v.is_floating_point())
    assert not (out / "models" / "model.pt").exists()


def _trainer(net, max_epochs):
    return SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=[{"image": torch.rand(1, 1, 16, 16, 16)}],
        network=net, optimizer=build_optimizer(net, lr=1e-3), loss_function=MaskedReconstructionLoss(8),
        prepare_batch=MAEPrepareBatch(), decollate=False,
    )  # fmt: skip


def _tiny_net():
    return MAEViT(1, 16, 8, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2, decoder_hidden_size=12,
                  decoder_mlp_dim=24, decoder_num_layers=1, decoder_num_heads=2)  # fmt: skip


def test_restart_rotates_old_checkpoints_and_removes_torn_temporaries(tmp_path):
    net = _tiny_net()
    trainer = _trainer(net, 3)
    EpochCheckpointer(tmp_path, {"network": net, "trainer": trainer}, n_saved=5).attach(trainer)
    trainer.run()  # epochs 1, 2, 3 on disk, as if killed afterwards ...
    (tmp_path / "tmpab_cd123").write_bytes(b"half a checkpoint")  # ... in the middle of writing epoch 4
    (tmp_path / "notes.txt").write_text("not ours")

    net2 = _tiny_net()
    trainer2 = _trainer(net2, 5)
    EpochCheckpointer(tmp_path, {"network": net2, "trainer": trainer2}, n_saved=2).attach(trainer2)
    resume = AutoResume(tmp_path, {"network": net2, "trainer": trainer2})
    resume.attach(trainer2)
    trainer2.run()
    assert resume.resumed_from == tmp_path / "checkpoint_epoch=3.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=4.pt", "checkpoint_epoch=5.pt", "notes.txt"]


def test_checkpoints_of_a_later_run_are_kept_and_reported(tmp_path, caplog):
    net = _tiny_net()
    trainer = _trainer(net, 1)
    stale = tmp_path / "checkpoint_epoch=9.pt"
    stale.write_bytes(b"from another run")
    EpochCheckpointer(tmp_path, {"network": net, "trainer": trainer}).attach(trainer)
    trainer.run()
    assert stale.exists() and (tmp_path / "checkpoint_epoch=1.pt").exists()
    assert "checkpoints of later epochs than 1 (['checkpoint_epoch=9.pt'])" in caplog.text
