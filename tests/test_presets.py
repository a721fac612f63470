from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monai_mae import MAE_PRESETS, MAEViT, get_preset, mae_vit
from monai_mae.networks.presets import mae_vit_tiny

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(MAE_PRESETS))
def test_config_files_mirror_presets(name):
    data = json.loads((CONFIGS / f"model_{name}.json").read_text())
    data.pop("_comment")
    assert data == MAE_PRESETS[name]


def test_paper_sizes():
    assert get_preset("base")["hidden_size"] == 768 and get_preset("base")["num_layers"] == 12
    assert get_preset("large")["hidden_size"] == 1024 and get_preset("large")["num_layers"] == 24
    for name in ("base", "large"):
        assert (get_preset(name)["decoder_hidden_size"], get_preset(name)["decoder_num_layers"]) == (512, 8)
    assert get_preset("small", num_layers=2)["num_layers"] == 2


@pytest.mark.parametrize("nd, size", [(2, (32, 32)), (3, (32, 32, 16))])
def test_tiny_builds_and_runs(nd, size):
    net = mae_vit_tiny(img_size=size, patch_size=8, spatial_dims=nd, num_layers=1)
    assert isinstance(net, MAEViT) and net.hidden_size == 192
    pred, mask = net(torch.randn(1, 1, *size))
    assert pred.shape == (1, net.patch_embedding.n_patches, 8**nd)


def test_unknown_preset():
    with pytest.raises(ValueError, match="huge"):
        mae_vit("huge")
