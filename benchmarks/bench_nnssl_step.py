"""One MAE training step: monai-mae's ``MAEViT`` with the Primus-exact encoder vs nnssl's ``EvaMAE`` (CPU).

Both encoders are Primus-S blocks (width 396, 6 heads, SwiGLU 1056; ``--depth`` blocks), 8^3 patches, 75% of the
tokens dropped, on a ``--size``^3 volume of one channel; a step is forward, a reconstruction loss on the masked
patches, backward and AdamW. Arms:

* ``evamae``: nnssl's ``EvaMAE`` as its ``BaseEvaMAETrainer`` builds it (a 2-block decoder of the encoder's width
  and heads, the ``PatchDecode`` up-projection, the loss on the masked voxels), restated from its parts in
  ``dynamic_network_architectures`` (``PatchEmbed``, ``Eva`` with timm's ``PatchDropout``, ``PatchDecode``);
* ``ours``: ``mae_vit("primus_s", ...)`` (the preset's decoder: 384 wide, 2 blocks, 8 heads);
* ``ours_wide_decoder``: the same with EvaMAE's decoder sizes (396 wide, 2 blocks, 6 heads).

Needs ``dynamic_network_architectures`` and timm, which are no dependencies of monai-mae: run it in the
environment of ``tests/fixtures/make_nnssl_fixture.py`` (its docstring; the script stubs torchvision for timm's
import where it does not import)::

    PYTHONPATH=$PWD /tmp/dnavenv/bin/python benchmarks/bench_nnssl_step.py --depth 12 --size 64 --steps 5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import cpu_name, load_average_1min, time_calls  # noqa: E402

from monai_mae.networks.patching import patchify  # noqa: E402
from monai_mae.networks.presets import mae_vit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEADS, MASKING = 396, 6, 0.75


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_nnssl_fixture", REPO / "tests/fixtures/make_nnssl_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EvaMAEStep(nn.Module):
    """nnssl's EvaMAE (encoder, mask tokens, decoder, up-projection; tokens ``(h w d)``), restated."""

    def __init__(self, dna, depth: int, size: int) -> None:
        super().__init__()
        grid = (size // 8,) * 3
        eva = dict(embed_dim=WIDTH, num_heads=HEADS, ref_feat_shape=grid, init_values=0.1, scale_attn_inner=True)
        self.rearrange = dna.rearrange
        self.down_projection = dna.PatchEmbed((8, 8, 8), 1, WIDTH)
        self.eva = dna.Eva(depth=depth, patch_drop_rate=MASKING, **eva)
        self.decoder = dna.Eva(depth=2, **eva)
        self.up_projection = dna.PatchDecode((8, 8, 8), WIDTH, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, WIDTH))

    def loss(self, image: torch.Tensor) -> torch.Tensor:
        grid = self.down_projection(image)  # (B, C, W, H, D)
        b, c, w, h, d = grid.shape
        encoded, keep = self.eva(self.rearrange(grid, "b c w h d -> b (h w d) c"))
        restored = self.mask_token.expand(b, w * h * d, c).clone()
        restored = restored.scatter(1, keep[..., None].expand(-1, -1, c), encoded)
        decoded, _ = self.decoder(restored)
        out = self.up_projection(self.rearrange(decoded, "b (h w d) c -> b c w h d", w=w, h=h, d=d))
        visible = torch.zeros(b, w * h * d, device=image.device).scatter(1, keep, 1.0)
        masked = 1 - self.rearrange(visible, "b (h w d) -> b 1 w h d", w=w, h=h, d=d)
        masked = F.interpolate(masked, scale_factor=8, mode="nearest")
        return ((out - image).square() * masked).sum() / masked.sum()


class OursStep(nn.Module):
    def __init__(self, depth: int, size: int, **decoder) -> None:
        super().__init__()
        self.mae = mae_vit("primus_s", img_size=size, patch_size=8, num_layers=depth, masking_ratio=MASKING, **decoder)

    def loss(self, image: torch.Tensor) -> torch.Tensor:
        pred, mask = self.mae(image)  # (B, N, P), (B, N): 1 = masked
        per_patch = (pred - patchify(image, (8, 8, 8))).square().mean(-1)
        return (per_patch * mask).sum() / mask.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dna = _fixture_module().import_dynamic_network_architectures()
    arms = {
        "evamae": lambda: EvaMAEStep(dna, args.depth, args.size),
        "ours": lambda: OursStep(args.depth, args.size),
        "ours_wide_decoder": lambda: OursStep(
            args.depth, args.size, decoder_hidden_size=WIDTH, decoder_mlp_dim=1056, decoder_num_heads=HEADS
        ),
    }
    image = torch.randn(args.batch, 1, args.size, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads, load {load_average_1min()}")
    print(f"Primus-S blocks x {args.depth}, {args.size}^3 input, batch {args.batch}, 8^3 patches, masking {MASKING}")
    steps, params = {}, {}
    for name, build in arms.items():
        torch.manual_seed(0)
        model = build().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        params[name] = sum(p.numel() for p in model.parameters()) / 1e6

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            model.loss(image).backward()
            optimizer.step()

        steps[name] = step
        time_calls(step, args.warmup)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.steps):  # the arms take turns, so that a change of the machine's load hits all of them
        for name, step in steps.items():
            times[name] += time_calls(step, 1)
    print("| arm | parameters (M) | step median (s) | min (s) |\n| --- | --- | --- | --- |")
    for name in arms:
        print(f"| {name} | {params[name]:.1f} | {statistics.median(times[name]):.3f} | {min(times[name]):.3f} |")


if __name__ == "__main__":
    main()
