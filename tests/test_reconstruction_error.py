"""The masked-patch error against the mean fill (the pretraining demo's figure) and the demo summaries."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine
from monai.inferers import SlidingWindowInferer

from monai_mae import demo
from monai_mae.engines import MaskedFillErrorProbe, ReconstructionErrorHandler, masked_fill_errors
from monai_mae.networks import MAEViT
from monai_mae.networks.masking import random_masking
from monai_mae.networks.patching import patchify

TINY = dict(
    hidden_size=32,
    mlp_dim=64,
    num_layers=1,
    num_heads=2,
    decoder_hidden_size=32,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
)


class Oracle(nn.Module):
    """Masks like an MAE and predicts every patch exactly (``mode="exact"``) or as the visible mean."""

    def __init__(self, patch_size, mode="exact", ratio=0.75):
        super().__init__()
        self.patch_size = patch_size
        self.mode = mode
        self.ratio = ratio

    def forward(self, x, masking_ratio=None, generator=None):
        patches = patchify(x, self.patch_size)
        mask = random_masking(patches, masking_ratio or self.ratio, generator=generator).mask.to(x.dtype)
        if self.mode == "exact":
            return patches, mask
        visible = (1 - mask)[..., None]
        mean = (patches * visible).sum((1, 2), keepdim=True) / (visible.sum((1, 2), keepdim=True) * patches.shape[2])
        return mean.expand_as(patches), mask


def test_probe_channels_are_reconstruction_mask_and_mean_fill():
    torch.manual_seed(0)
    net = MAEViT(1, (16, 16, 16), patch_size=8, spatial_dims=3, **TINY).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    out = MaskedFillErrorProbe(net, seed=3)(x)
    assert out.shape == (2, 3, 16, 16, 16)
    recon, masked, fill = out[:, :1], out[:, 1:2], out[:, 2:]
    assert set(masked.unique().tolist()) == {0.0, 1.0}
    assert masked.sum().item() == 2 * 6 * 512  # 75% of 8 patches of 8^3 voxels, per sample
    visible = masked == 0
    assert torch.equal(recon[visible], x[visible]) and torch.equal(fill[visible], x[visible])
    for b in range(2):
        expected = x[b][visible[b]].mean()
        assert torch.allclose(fill[b][~visible[b]], expected.expand(6 * 512), atol=1e-6)
    assert torch.equal(out, MaskedFillErrorProbe(net, seed=3)(x))  # the same mask on every call
    assert not torch.equal(out[:, 1:2], MaskedFillErrorProbe(net, seed=4)(x)[:, 1:2])


def test_masked_fill_errors_sums_on_masked_voxels_only():
    image = torch.zeros(1, 1, 2, 2)
    recon = torch.tensor([[[[1.0, 5.0], [0.0, 0.0]]]])
    masked = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    fill = torch.full((1, 1, 2, 2), 2.0)
    errors = masked_fill_errors(torch.cat([recon, masked, fill], 1), image)
    assert errors == (1.0, 8.0, 2.0)
    with pytest.raises(ValueError, match="probe's output"):
        masked_fill_errors(torch.zeros(1, 2, 2, 2), image)


@pytest.mark.parametrize("mode, expected", [("exact", 0.0), ("mean", 1.0)])
def test_handler_ratio_is_zero_for_a_perfect_guess_and_one_for_the_mean(tmp_path, mode, expected):
    torch.manual_seed(0)
    probe = MaskedFillErrorProbe(Oracle((8, 8, 8), mode), seed=0)
    handler = ReconstructionErrorHandler(
        probe, SlidingWindowInferer((16, 16, 16), sw_batch_size=2), "cpu", tmp_path / "out" / "error.json"
    )
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    batches = [{"image": torch.rand(1, 1, 32, 16, 16) + 1.0} for _ in range(2)]
    batches.append([{"image": torch.rand(1, 32, 16, 16) + 1.0}])  # decollated, as MONAI's evaluators leave it
    engine.run(batches, max_epochs=1)
    saved = json.loads((tmp_path / "out" / "error.json").read_text())
    assert saved["volumes"] == 3
    assert saved["masked_mse_ratio"] == pytest.approx(expected, abs=1e-6)
    assert engine.state.metrics["masked_mse_ratio"] == pytest.approx(expected, abs=1e-6)
    assert saved["mean_fill_mse"] > 0.01
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_pretrain_summary_line_and_target(tmp_path, capsys):
    (tmp_path / "reconstruction_error.json").write_text(json.dumps({"masked_mse_ratio": 0.31, "volumes": 2}))
    line, passed = demo.pretrain_summary(tmp_path)
    assert passed and "0.31 x" in line and "2 validation phantoms" in line
    assert str(tmp_path / "reconstructions" / "latest.png") in line
    assert demo.main(["pretrain", str(tmp_path), "--target", "0.3"]) == 1
    assert "MISSED" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="inference.json"):
        demo.pretrain_summary(tmp_path / "nothing")


def test_finetune_summary_line_and_target(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    metrics = {"val_mean_dice": 0.71, "val_dice_liver": 0.9, "val_dice_spleen": 0.52}
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"metrics": metrics, "num_cases": 2}))
    assert demo.main(["finetune", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mean Dice 0.710 on 2 phantoms (liver 0.90, spleen 0.52)" in out and "met" in out
    assert out.count("\n") == 1
    (tmp_path / "eval" / "metrics.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        demo.finetune_summary(tmp_path)
