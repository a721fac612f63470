"""bf16 autocast on the CPU: ``AutocastInferer``, ``amp_inferer``, ``engine_amp`` and an MAE training step under it."""

from __future__ import annotations

import warnings

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.inferers import SimpleInferer, SlidingWindowInferer

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.engines import MAEPrepareBatch
from monai_mae.engines import precision
from monai_mae.engines.precision import AutocastInferer, amp_inferer, cpu_bf16_supported, engine_amp


class _Recorder(torch.nn.Module):
    """A linear layer that records the dtype its matrix product ran in, and returns several kinds of output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> tuple:
        y = self.linear(x)
        self.seen.append(y.dtype)
        return y, {"mask": x > 0, "ids": torch.arange(3), "again": y * 2}, [y.float()]


def test_autocast_inferer_runs_the_network_in_bf16_and_returns_float32():
    net = _Recorder()
    x = torch.randn(5, 4)
    y, extra, listed = AutocastInferer(SimpleInferer())(x, net)
    assert net.seen == [torch.bfloat16]
    assert y.dtype == torch.float32 and extra["again"].dtype == torch.float32 and listed[0].dtype == torch.float32
    assert extra["mask"].dtype == torch.bool and extra["ids"].dtype == torch.int64  # non-float outputs untouched
    torch.testing.assert_close(y, net.linear(x), atol=0.05, rtol=0.02)  # bf16 rounding only


def test_disabled_autocast_inferer_is_the_plain_inferer():
    net = _Recorder()
    x = torch.randn(5, 4)
    y, _, _ = AutocastInferer(SimpleInferer(), enabled=False)(x, net)
    assert net.seen == [torch.float32]
    assert torch.equal(y, net.linear(x))


def test_autocast_inferer_wraps_sliding_windows():
    net = torch.nn.Conv3d(1, 2, 1)  # pointwise: windows stitch back exactly
    x = torch.randn(1, 1, 12, 12, 10)
    inferer = AutocastInferer(SlidingWindowInferer(roi_size=8, sw_batch_size=2, overlap=0.25))
    out = inferer(x, net)
    assert out.shape == (1, 2, 12, 12, 10) and out.dtype == torch.float32
    torch.testing.assert_close(out, net(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"inferer": 3}, "inferer must be"), ({"device_type": "mps"}, "device_type"), ({"dtype": torch.float64}, "dtype")],
)
def test_autocast_inferer_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutocastInferer(**{"inferer": SimpleInferer(), **kwargs})


def test_amp_inferer_wraps_only_on_a_cpu_with_amp(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    inner = SimpleInferer()
    assert amp_inferer(inner, "cuda:1", True) is inner  # MONAI's engines handle CUDA
    assert amp_inferer(inner, "cpu", False) is inner
    wrapped = amp_inferer(inner, torch.device("cpu"), True)
    assert isinstance(wrapped, AutocastInferer) and wrapped.inferer is inner and wrapped.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="amp must be true or false"):
        amp_inferer(inner, "cpu", "yes")
    with pytest.raises(ValueError, match="'meta'"):
        amp_inferer(inner, "meta", True)


def test_amp_inferer_warns_on_a_cpu_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    with pytest.warns(RuntimeWarning, match="AVX512-BF16"):
        assert isinstance(amp_inferer(SimpleInferer(), "cpu", True), AutocastInferer)
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amp_inferer(SimpleInferer(), "cpu", True)


def test_engine_amp_is_on_for_cuda_only():
    assert engine_amp("cuda:1", True) is True
    assert engine_amp(torch.device("cuda"), False) is False
    assert engine_amp("cpu", True) is False


def test_cpu_bf16_support_matches_the_cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:
        pytest.fail("these tests run on Linux, where /proc/cpuinfo exists")
    if any(flag in flags for flag in precision.CPU_BF16_FLAGS):
        assert cpu_bf16_supported() is True
    else:  # oneDNN agrees with the flags on x86; it may only add support, never remove it
        assert cpu_bf16_supported() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("options", [{}, {"pos_embed_type": "rope", "mlp_type": "swiglu", "layer_scale_init": 0.1}],
                         ids=["default", "primus-blocks"])  # fmt: skip
def test_an_mae_trains_under_cpu_autocast(options, monkeypatch):
    """Two SupervisedTrainer steps as the pretraining bundle runs them with ``amp`` on a CPU: finite float32 loss, float32 grads."""
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    torch.manual_seed(0)
    net = MAEViT(1, 16, 8, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2, decoder_hidden_size=16,
                 decoder_mlp_dim=32, decoder_num_layers=1, decoder_num_heads=2, **options)  # fmt: skip
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = [{"image": torch.rand(2, 1, 16, 16, 16)} for _ in range(2)]
    losses = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3), loss_function=MaskedReconstructionLoss(8),
        prepare_batch=MAEPrepareBatch(), inferer=amp_inferer(SimpleInferer(), "cpu", True),
        amp=engine_amp("cpu", True), decollate=False,
    )  # fmt: skip
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    trainer.run()
    assert len(losses) == 2 and all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in net.parameters())
    assert all(v.dtype == before[k].dtype for k, v in net.state_dict().items())
    assert not torch.equal(net.state_dict()["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
