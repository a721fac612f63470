"""The GPU fast path (bf16 autocast, torch.compile, fused AdamW, the benchmark), exercised on the CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from bundle_utils import REPO, TINY_NETWORK
from ignite.engine import Events
from monai.bundle import ConfigParser

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.data import write_synthetic_dataset
from monai_mae.engines import build_optimizer, fused_adamw_supported

TINY = dict(hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4, decoder_hidden_size=24, decoder_mlp_dim=48,
            decoder_num_layers=1, decoder_num_heads=4)  # fmt: skip
CONFIGS = REPO / "bundles" / "mae_pretrain" / "configs"


def _generator(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_bf16_autocast_keeps_fp32_master_weights():
    net = MAEViT(1, 16, 8, **TINY)
    loss_fn = MaskedReconstructionLoss(8)
    optimizer = build_optimizer(net, lr=1e-3)
    images = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        reference = loss_fn(net(images, generator=_generator()), images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred, mask = net(images, generator=_generator())
        loss = loss_fn((pred, mask), images)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference.item(), rel=0.05)
    loss.backward()
    optimizer.step()
    params = [p for p in net.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in params if p.grad is not None)


def test_fused_adamw_step_matches_the_default_one():
    torch.manual_seed(0)
    nets = [MAEViT(1, 16, 8, **TINY) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    images = torch.rand(2, 1, 16, 16, 16)
    for net, fused in zip(nets, (False, True)):
        optimizer = build_optimizer(net, lr=1e-3, fused=fused)
        assert bool(optimizer.defaults["fused"]) is fused
        MaskedReconstructionLoss(8)(net(images, generator=_generator()), images).backward()
        optimizer.step()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_build_optimizer_picks_the_fused_kernel_from_the_parameters_device():
    net = MAEViT(1, 16, 8, **TINY)
    # the CPU kernel exists from torch 2.4 on (this project installs 2.13 on CPU machines)
    assert bool(build_optimizer(net).defaults["fused"]) is True
    assert fused_adamw_supported(net.parameters())
    assert not fused_adamw_supported([])
    assert not fused_adamw_supported([torch.zeros(3, dtype=torch.int64)])
    assert not fused_adamw_supported([torch.zeros(3, device="meta")])  # neither CPU nor CUDA
    assert bool(build_optimizer(net, fused=False).defaults["fused"]) is False


@pytest.mark.slow  # inductor runs the C++ compiler in subprocesses
def test_torch_compile_matches_eager(cxx_compiler):
    # inductor compiles C++ kernels with g++: ~15 s with a warm cache (/tmp/torchinductor_$USER), up to ~1 min cold
    torch._dynamo.reset()
    net = MAEViT(1, 16, 8, **TINY).eval()
    images = torch.rand(2, 1, 16, 16, 16)
    compiled = torch.compile(net)
    try:
        with torch.no_grad():
            pred, mask = net(images, generator=_generator())
            pred_c, mask_c = compiled(images, generator=_generator())
    finally:
        torch._dynamo.reset()
    assert torch.equal(mask, mask_c)
    torch.testing.assert_close(pred_c, pred, rtol=1e-3, atol=1e-4)


def test_train_config_wires_compile_amp_and_optimizer(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, num=2, num_validation=1, shape=(24, 24, 16), num_organs=1)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"bundle_root": str(REPO / "bundles" / "mae_pretrain"), "dataset_dir": str(data),
                   "output_dir": str(tmp_path / "out"), "roi_size": [16, 16, 16], "patch_size": [8, 8, 8],
                   "num_workers": 0, "compile": True, "device": "cpu", **TINY_NETWORK})  # fmt: skip
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.compile and isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.network._orig_mod is parser.get_parsed_content("network")
    assert trainer.amp is False  # MONAI's autocast is CUDA-only; amp defaults to off on a CPU
    assert parser.get_parsed_content("amp_dtype") in (torch.bfloat16, torch.float16)
    fused = bool(parser.get_parsed_content("optimizer").defaults["fused"])
    assert fused is fused_adamw_supported(parser.get_parsed_content("network").parameters())
    assert fused  # CUDA, or CPU with torch >= 2.4
    assert parser.get_parsed_content("train#dataloader").pin_memory is False
    parser.get_parsed_content("tb_writer").close()
    torch._dynamo.reset()


COMPILE_RUNS = {
    "mae_pretrain": {"roi_size": [16, 16, 16], "patch_size": [8, 8, 8], **TINY_NETWORK},
    "mae_finetune": {"architecture": "vitseg", "roi_size": [32, 32, 32], "num_classes": 3, "encoder#hidden_size": 24,
                     "encoder#mlp_dim": 48, "encoder#num_layers": 2, "encoder#num_heads": 2,
                     "vitseg#decoder_channels": [8, 8, 8]},
}  # fmt: skip


@pytest.mark.slow  # two bundle runs under torch.compile
@pytest.mark.parametrize("bundle", sorted(COMPILE_RUNS))
def test_compiled_bundle_trains_two_iterations_on_nifti_data(bundle, tmp_path):
    """``--compile True`` on NIfTI volumes: the loaders give MetaTensors, the network must get plain tensors.

    MONAI's trainer re-wraps a compiled network's output as a MetaTensor when its input was one, which failed
    on the MAE's ``(pred, mask)`` tuple. aot_eager: the dynamo graph capture without inductor's C++ build.
    """
    data = tmp_path / "data"
    write_synthetic_dataset(data, num=3, num_validation=1, shape=(32, 32, 32), num_organs=2)
    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    parser.update({"bundle_root": str(configs.parent), "dataset_dir": str(data), "output_dir": str(tmp_path / "out"),
                   "device": "cpu", "num_workers": 0, "max_epochs": 1, "batch_size": 1, "num_samples": 1,
                   "val_interval": 5, "progress_bar": False, "compile": True,
                   "compile_kwargs": {"backend": "aot_eager"}, **COMPILE_RUNS[bundle]})  # fmt: skip
    torch._dynamo.reset()
    try:
        for index in range(len(parser.get("initialize"))):
            parser.get_parsed_content(f"initialize#{index}")
        trainer = parser.get_parsed_content("train#trainer")
        assert isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule)
        inputs = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: inputs.append(type(e.state.output["image"])))
        for index in range(len(parser.get("run"))):
            parser.get_parsed_content(f"run#{index}")
    finally:
        torch._dynamo.reset()
        parser.get_parsed_content("tb_writer").close()
    assert trainer.state.iteration == 2 and inputs == [torch.Tensor, torch.Tensor]
    assert torch.isfinite(torch.as_tensor(trainer.state.output["loss"]))
    assert (tmp_path / "out" / "models" / "model.pt").is_file()


def _bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"}
    )


@pytest.mark.slow
def test_bench_gpu_cpu_smoke():
    result = _bench("--cpu-smoke", "--peak-tflops", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny | 32^3 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["monai_mae", "monai"]
    assert "| bf16 autocast |" in rows[0] and all("%" in row for row in rows)


def test_bench_gpu_without_cuda_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the message printed without a CUDA device
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--encoders", "vit-b", "--sizes", "96"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "no CUDA device is available" in message and "--cpu-smoke" in message


def _bench_gpu_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize(
    "name, tflops",
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
     ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 Something New", None),
     ("Tesla V100-SXM2-16GB", None)],
)  # fmt: skip
def test_mfu_peak_is_looked_up_by_the_exact_device_name(name, tflops, monkeypatch):
    """Every H100 was credited with the SXM peak; PCIe and NVL parts peak lower, unknown parts get no MFU."""
    bench = _bench_gpu_module(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    args = bench._parser().parse_args([])
    peak, text = bench._peak_flops(args, torch.device("cuda", 0))
    if tflops is None:
        assert peak is None and f"unknown for {name!r}: no MFU" in text
    else:
        assert peak == tflops * 1e12 and text == f"{tflops:g} TFLOP/s ({name})"
    forced = bench._peak_flops(bench._parser().parse_args(["--gpu", "NVIDIA H100 PCIe"]), torch.device("cuda", 0))
    assert forced == (756e12, "756 TFLOP/s (NVIDIA H100 PCIe)")
