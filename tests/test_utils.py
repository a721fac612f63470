"""monai_mae.utils: the shared ViT finder, weight-decay rule, JSON reader and number check."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR, ViT

from monai_mae.networks.mae import MAEViT
from monai_mae.networks.vitseg import ViTSeg
from monai_mae.utils import find_vit, is_positive_finite, no_weight_decay, read_json

WIDTH = dict(hidden_size=24, mlp_dim=32, num_heads=2)


@pytest.mark.parametrize(
    "build, prefix",
    [
        (lambda: UNETR(1, 2, 32, feature_size=4, **WIDTH), "vit."),
        (lambda: ViT(1, 32, 16, num_layers=1, **WIDTH), ""),
        (lambda: ViTSeg(1, 2, 32, num_layers=1, **WIDTH), ""),
        (lambda: MAEViT(1, 32, 16, num_layers=1, **WIDTH, decoder_num_heads=2), ""),
        (lambda: torch.nn.DataParallel(UNETR(1, 2, 32, feature_size=4, **WIDTH)), "module.vit."),
    ],
    ids=["UNETR", "ViT", "ViTSeg", "MAEViT", "DataParallel(UNETR)"],
)
def test_find_vit(build, prefix):
    network = build()
    vit, found = find_vit(network)
    assert found == prefix  # the prefix of the encoder's keys in network.state_dict()
    assert network.state_dict(keep_vars=True)[f"{prefix}blocks.0.norm1.weight"] is vit.blocks[0].norm1.weight


@pytest.mark.parametrize("network", [torch.nn.Linear(2, 2), "unetr", None], ids=["Linear", "str", "None"])
def test_find_vit_names_the_caller_and_the_type(network):
    with pytest.raises(
        ValueError, match=rf"^layerwise_lr_groups expects a MONAI UNETR, .*got {type(network).__name__}\.$"
    ):
        find_vit(network, "layerwise_lr_groups")


@pytest.mark.parametrize(
    "name, shape, expected",
    [("blocks.0.attn.qkv.weight", (6, 2), False), ("blocks.0.attn.qkv.bias", (6,), True),
     ("blocks.0.ls1.gamma", (2,), True), ("cls_token", (1, 1, 2), True), ("mask_tokens", (1, 1, 2), True),
     ("patch_embedding.position_embeddings", (1, 8, 2), True), ("decoder_pos_embedding", (1, 8, 2), True),
     ("patch_embedding.patch_embeddings.weight", (2, 1, 4, 4), False)],
)  # fmt: skip
def test_no_weight_decay(name, shape, expected):
    assert no_weight_decay(name, torch.zeros(shape)) is expected


def test_read_json(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    assert read_json(good) == read_json(str(good)) == {"a": [1, 2]}
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1\n  "b": 2\n}')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line 3, column 3: Expecting ','"):
        read_json(bad)
    with pytest.raises(ValueError, match=r"^preset x: malformed JSON at line 3"):
        read_json(bad, name="preset x")
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"a": "é"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.json: not a UTF-8 text JSON file"):
        read_json(latin)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")
    with pytest.raises(TypeError, match="read_json: path must be a path or have read_text\\(\\), got int"):
        read_json(3)


@pytest.mark.parametrize("value, expected", [(1, True), (0.5, True), (0, False), (-2.0, False), (float("nan"), False),
                                             (float("inf"), False), (True, False), ("1", False), (None, False)])  # fmt: skip
def test_is_positive_finite(value, expected):
    assert is_positive_finite(value) is expected
