"""Checkpoint layouts: one adapter per layout behind one reader (``read_checkpoint``), and one MONAI renaming
shared by the reader and ``MAEViT``'s load pre-hook."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import MaskedAutoEncoderViT

from monai_mae.model_file import read_model, save_model
from monai_mae.networks import checkpoint_io
from monai_mae.networks.checkpoint_adapters import ADAPTERS, CheckpointAdapter, monai_mae_renames
from monai_mae.networks.checkpoint_io import read_checkpoint, split_encoder
from monai_mae.networks.mae import MAEViT

ARGS = dict(
    in_channels=1,
    img_size=32,
    patch_size=16,
    hidden_size=24,
    mlp_dim=48,
    num_layers=2,
    num_heads=4,
    decoder_hidden_size=12,
    decoder_mlp_dim=24,
    decoder_num_layers=1,
    decoder_num_heads=4,
)


@pytest.fixture(scope="module")
def monai_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return MaskedAutoEncoderViT(**ARGS).state_dict()


@pytest.fixture(scope="module")
def ours(monai_state) -> MAEViT:
    """MAEViT holding MONAI's weights (through the load pre-hook)."""
    net = MAEViT(**ARGS)
    net.load_state_dict(monai_state)
    return net


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize(
    "wrap, layouts",
    [
        (lambda monai, ours: ours.state_dict(), ()),
        (lambda monai, ours: ours, ()),
        (lambda monai, ours: monai, ("MONAI MaskedAutoEncoderViT",)),
        (
            lambda monai, ours: {"network": _prefixed(ours.state_dict(), "module."), "optimizer": {}, "epoch": 3},
            ("bundle/Ignite checkpoint",),
        ),
        (
            lambda monai, ours: {"state_dict": {"model": _prefixed(monai, "_orig_mod.")}, "epoch": 1},
            ("bundle/Ignite checkpoint", "MONAI MaskedAutoEncoderViT"),
        ),
    ],
)
def test_every_layout_reads_to_the_same_encoder(monai_state, ours, wrap, layouts):
    """The reader (MONAI adapter) and MAEViT's pre-hook rename MONAI's layout the same way."""
    found = read_checkpoint(wrap(monai_state, ours))
    encoder, _ = split_encoder(found.state)
    expected, _ = split_encoder(ours.state_dict())
    assert found.layouts == layouts
    assert sorted(encoder) == sorted(expected) and "norm.weight" in encoder and "blocks.2.weight" not in encoder
    assert all(torch.equal(encoder[k], v) for k, v in expected.items())


def test_model_file_layout_gives_weights_and_position_kind(tmp_path):
    net = MAEViT(**{**ARGS, "pos_embed_type": "rope", "cls_token": False, "decoder_num_heads": 2})
    path = save_model(net, tmp_path / "model.pt")
    found = read_checkpoint(path)
    assert found.layouts == ("model file",) and found.pos_embed_type == "rope" and found.grid is None
    assert all(torch.equal(found.state[k], v) for k, v in net.state_dict().items())
    assert read_model(path).network["pos_embed_type"] == "rope"  # the same file through model_file's reader


@pytest.mark.parametrize(
    "keys, prefix, depths, expected",
    [
        # depth recognised: the last block index holding only weight / bias is the final norm
        (
            ["blocks.0.attn.qkv.weight", "blocks.1.weight", "blocks.1.bias"],
            "",
            None,
            {"blocks.1.weight": "norm.weight", "blocks.1.bias": "norm.bias"},
        ),
        # our own layout: nothing to rename
        (["blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight", "norm.weight"], "", None, {}),
        # the last block is a real block: not a norm
        (["blocks.0.attn.qkv.weight", "blocks.1.mlp.linear1.weight"], "", None, {}),
        # exact depths (the pre-hook), decoder too, under a prefix; stale cross-attention dropped
        (
            [
                "mae.blocks.0.cross_attn.to_q.weight",
                "mae.blocks.0.norm_cross_attn.weight",
                "mae.blocks.1.weight",
                "mae.decoder_blocks.1.bias",
            ],
            "mae.",
            {"blocks": 1, "decoder_blocks": 1},
            {
                "mae.blocks.0.cross_attn.to_q.weight": None,
                "mae.blocks.1.weight": "mae.norm.weight",
                "mae.decoder_blocks.1.bias": "mae.decoder_norm.bias",
            },
        ),
    ],
)
def test_monai_mae_renames(keys, prefix, depths, expected):
    assert monai_mae_renames(keys, prefix, depths) == expected


class _PrefixedLayout(CheckpointAdapter):
    """A foreign layout of the kind an nnssl adapter reads: weights beside a plan, keys under ``encoder.``."""

    name = "prefixed"

    def unpack(self, obj):
        return (obj["weights"], {"network": obj["plan"]}) if "plan" in obj else None

    def rename(self, state):
        return {k.removeprefix("encoder."): v for k, v in state.items()} if "encoder.norm.weight" in state else state


def test_a_new_layout_is_one_more_adapter(monkeypatch, ours):
    monkeypatch.setattr(checkpoint_io, "ADAPTERS", (_PrefixedLayout(), *ADAPTERS))
    encoder = _prefixed(split_encoder(ours.state_dict())[0], "encoder.")
    foreign = {"weights": encoder, "plan": {"pos_embed_type": "sincos"}}
    found = read_checkpoint(foreign)
    assert found.layouts == ("prefixed", "prefixed") and found.pos_embed_type == "sincos"
    assert torch.equal(found.state["norm.weight"], ours.state_dict()["norm.weight"])
    monkeypatch.setattr(checkpoint_io, "ADAPTERS", ADAPTERS)  # without its adapter the layout is not read
    with pytest.raises(ValueError, match=r"no encoder weights .* top-level keys are weights, plan"):
        read_checkpoint(foreign)
