"""nnssl checkpoints of Primus built live with dynamic-network-architectures (where it and timm import).

monai-mae does not depend on either; ``tests/test_nnssl.py`` checks the same mapping on committed fixtures. These
cases add what the fixtures leave out: non-cubic patch grids, other head widths, Primus without LayerScale and
the attention's inner norm. Run them in an environment with both packages, e.g. the one described in
``tests/fixtures/make_nnssl_fixture.py``: ``PYTHONPATH=$PWD /tmp/dnavenv/bin/python -m pytest tests/test_nnssl_live.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from monai_mae import load_mae_encoder
from monai_mae.networks.nnssl import nnssl_checkpoint, nnssl_model_file
from monai_mae.networks.vitseg import ViTSeg

if importlib.util.find_spec("dynamic_network_architectures") is None or importlib.util.find_spec("timm") is None:
    pytest.skip("needs dynamic_network_architectures and timm (no dependencies of monai-mae)", allow_module_level=True)

_SPEC = importlib.util.spec_from_file_location(
    "make_nnssl_fixture", Path(__file__).parent / "fixtures" / "make_nnssl_fixture.py"
)
fixture = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fixture)
dna = fixture.import_dynamic_network_architectures()  # stubs torchvision only where it does not import


def primus(width: int, heads: int, crop: tuple[int, ...], exact: bool = True, depth: int = 2) -> torch.nn.Module:
    net = dna.Primus(
        1,
        width,
        (8, 8, 8),
        2,
        eva_depth=depth,
        eva_numheads=heads,
        input_shape=crop,
        init_values=0.1 if exact else None,
        scale_attn_inner=exact,
    )
    fixture.add_noise_(net, 0)
    return net.eval()


@pytest.mark.parametrize(
    "width, heads, crop, exact",
    [(36, 3, (32, 48, 16), True), (48, 2, (24, 32, 40), True), (36, 3, (32, 32, 32), False)],
)
@pytest.mark.parametrize("axes", [(2, 1, 0), (0, 1, 2)])
def test_live_primus_features_and_round_trip(width, heads, crop, exact, axes):
    net = primus(width, heads, crop, exact)
    plan = fixture.adaptation_plan("PrimusM", {"onemmiso": fixture.configuration([1.0, 1.0, 1.0], crop)})
    obj = fixture.checkpoint(net, "SimMIMEvaTrainer", plan)
    model = nnssl_model_file(obj, num_heads=heads, axes=axes)
    network = {k: v for k, v in model["monai_mae"]["network"].items() if k != "_target_"}
    assert (network["attn_norm"], network["layer_scale_init"]) == ((True, 0.1) if exact else (False, None))
    seg = ViTSeg(out_channels=2, **network).eval()
    assert not load_mae_encoder(seg, model).missing
    x = torch.randn(1, 1, *crop)
    with torch.no_grad():
        expected = fixture.encoder_features(dna, net, x, "w h d")
        tokens, _ = seg.forward_features(x.permute(0, 1, *(2 + a for a in axes)))
    got = tokens.transpose(1, 2).reshape(1, width, *seg.grid_size)
    torch.testing.assert_close(got, expected.permute(0, 1, *(2 + a for a in axes)), rtol=0, atol=1e-5)
    exported = nnssl_checkpoint(seg, model["monai_mae"]["data_preset"], axes=axes, architecture="PrimusM")
    weights = {k: v for k, v in net.state_dict().items() if k.startswith(("eva.", "down_projection."))}
    assert set(exported["network_weights"]) == set(weights)
    assert all(torch.equal(exported["network_weights"][k], v) for k, v in weights.items())
    strict = primus(width, heads, crop, exact)  # nnU-Net's strict load of the stem and the encoder
    strict.load_state_dict({**strict.state_dict(), **exported["network_weights"]}, strict=True)


def test_live_primus_s_features():
    """Primus-S as nnssl trains it (width 396, 6 heads, 12 blocks): the features after all 12 blocks agree too."""
    crop = (32, 32, 32)
    net = primus(396, 6, crop, depth=12)
    plan = fixture.adaptation_plan("PrimusS", {"onemmiso": fixture.configuration([1.0, 1.0, 1.0], crop)})
    model = nnssl_model_file(fixture.checkpoint(net, "SimMIMEvaTrainer", plan))  # heads from the name: S has 6
    network = {k: v for k, v in model["monai_mae"]["network"].items() if k != "_target_"}
    assert (network["hidden_size"], network["num_heads"], network["num_layers"]) == (396, 6, 12)
    seg = ViTSeg(out_channels=2, **network).eval()
    assert not load_mae_encoder(seg, model).missing
    x = torch.randn(1, 1, *crop)
    with torch.no_grad():
        expected = fixture.encoder_features(dna, net, x, "w h d")
        tokens, _ = seg.forward_features(x.permute(0, 1, 4, 3, 2))
    got = tokens.transpose(1, 2).reshape(1, 396, *seg.grid_size)
    torch.testing.assert_close(got, expected.permute(0, 1, 4, 3, 2), rtol=0, atol=1e-5)


def test_live_evamae_features():
    net = fixture.build_evamae(dna).eval()
    fixture.add_noise_(net, 5)
    obj = fixture.checkpoint(
        net, "BaseEvaMAETrainer", fixture.adaptation_plan("PrimusM", fixture.configuration([1.0] * 3))
    )
    seg_args = nnssl_model_file(obj, num_heads=fixture.HEADS)
    network = {k: v for k, v in seg_args["monai_mae"]["network"].items() if k != "_target_"}
    seg = ViTSeg(out_channels=2, **network).eval()
    load_mae_encoder(seg, seg_args)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        expected = fixture.encoder_features(dna, net, x, "h w d")
        tokens, _ = seg.forward_features(x.permute(0, 1, 4, 3, 2))
    got = tokens.transpose(1, 2).reshape(2, fixture.WIDTH, *seg.grid_size)
    torch.testing.assert_close(got, expected.permute(0, 1, 4, 3, 2), rtol=0, atol=1e-5)
