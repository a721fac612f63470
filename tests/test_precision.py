"""bf16 autocast on the CPU: ``AutocastInferer``, ``amp_inferer``, ``engine_amp`` and an MAE training step under it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import SimpleInferer, SlidingWindowInferer

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.engines import GradientClipping, MAEPrepareBatch, precision
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


# ------------------------------------------------------------------ the autocast dtype and the GradScaler
@pytest.mark.parametrize("capability, expected", [((9, 0), True), ((8, 6), True), ((8, 0), True), ((7, 5), False),
                                                  ((7, 0), False)])  # fmt: skip
def test_bf16_on_cuda_only_where_the_gpu_computes_it_natively(capability, expected, monkeypatch):
    """V100 (7.0) and T4 (7.5) emulate bf16 (``is_bf16_supported()`` counts that): fp16 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert precision.cuda_bf16_supported("cuda:1") is expected
    assert asked == [torch.device("cuda:1")]  # the GPU named, not the current one
    assert precision.amp_dtype("cuda:1") == (torch.bfloat16 if expected else torch.float16)
    assert precision.amp_dtype("cpu") == torch.bfloat16


def test_without_cuda_no_gpu_counts_as_bf16_capable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.cuda_bf16_supported("cuda") is False and precision.cuda_bf16_supported("cpu") is False


class _Poisoned(torch.nn.Module):
    """A linear layer whose weight gradient is +inf while ``poison`` is set (the loss stays finite)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.poison = False
        self.linear.weight.register_hook(lambda g: torch.full_like(g, float("inf")) if self.poison else g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _scaled_trainer(net: torch.nn.Module, dtype: torch.dtype, poison_at: int | None = None):
    """A MONAI trainer with ``amp`` on and a CPU GradScaler from AmpGradScaler, clipping at norm 0.5."""
    torch.manual_seed(0)
    data = [(torch.randn(3, 4), torch.randn(3, 2)) for _ in range(3)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(), amp=True,
        decollate=False,
    )  # fmt: skip
    record: list[dict] = []
    trainer.add_event_handler(
        Events.ITERATION_STARTED, lambda e: setattr(net, "poison", e.state.iteration == poison_at)
    )
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: record.append({"before": net.linear.weight.clone()}))
    precision.AmpGradScaler(dtype, device_type="cpu").attach(trainer)
    GradientClipping(max_norm=0.5).attach(trainer)
    trainer.add_event_handler(  # after the clipping: the gradients the optimizer will see, and the scale
        IterationEvents.BACKWARD_COMPLETED,
        lambda e: record[-1].update(grad=net.linear.weight.grad.clone(), scale=e.scaler.get_scale(),
                                    enabled=e.scaler.is_enabled()),
    )  # fmt: skip
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: record[-1].update(after=net.linear.weight.clone()))
    return trainer, data, record


def test_fp16_scaler_unscales_clips_and_skips_the_step_with_an_inf_gradient():
    net = _Poisoned()
    reference = copy.deepcopy(net.linear)
    trainer, data, record = _scaled_trainer(net, torch.float16, poison_at=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI opens torch.autocast("cuda") on a machine without CUDA
        trainer.run()
    assert [r["enabled"] for r in record] == [True] * 3
    # iteration 1: the gradient the optimizer sees is the true one (unscaled), clipped to norm 0.5, and applied
    images, labels = data[0]
    torch.nn.MSELoss()(reference(images), labels).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.testing.assert_close(record[0]["grad"], reference.weight.grad)
    torch.testing.assert_close(record[0]["after"], record[0]["before"] - 0.1 * reference.weight.grad)
    # iteration 2: an inf gradient; the step is skipped (weights unchanged) and the scale backs off by half
    assert not torch.isfinite(record[1]["grad"]).all()
    assert torch.equal(record[1]["after"], record[1]["before"])
    assert record[0]["scale"] == 2.0**16 and trainer.scaler.get_scale() == 2.0**15
    # iteration 3: finite again, the optimizer steps
    assert torch.isfinite(record[2]["after"]).all() and not torch.equal(record[2]["after"], record[2]["before"])


def test_bf16_gets_a_disabled_scaler_that_steps_unscaled():
    net = _Poisoned()
    trainer, _, record = _scaled_trainer(net, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.run()
    assert [r["enabled"] for r in record] == [False] * 3 and trainer.scaler.get_scale() == 1.0
    assert all(torch.linalg.vector_norm(r["grad"]) <= 0.5 + 1e-6 for r in record)  # clipped, never scaled
    assert all(not torch.equal(r["after"], r["before"]) for r in record)
    with pytest.raises(ValueError, match="dtype must be"):
        precision.AmpGradScaler(torch.float32)
