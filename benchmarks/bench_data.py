"""Does the CT data pipeline keep up with training?

Measures, in one run on the synthetic phantoms:

* volumes per second through the pretraining CT pipeline (load, RAS, resample, window, foreground
  crop, pad, ``num_samples`` random crops, flips) with no cache, MONAI ``CacheDataset`` (steady
  state after the first pass, which is reported separately) and ``PersistentDataset``;
* the network's training steps per second (MAEViT forward + masked loss + backward + AdamW) on
  batches of the same crops, and from it the volumes per second training consumes.

Run::

    .venv/bin/python benchmarks/bench_data.py                 # ViT-B, 96^3 crops
    .venv/bin/python benchmarks/bench_data.py --quick         # small smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from monai.data import DataLoader

from monai_mae import MaskedReconstructionLoss, mae_vit
from monai_mae.data import get_dataset, get_pretrain_transforms, load_datalist, write_synthetic_dataset
from monai_mae.engines import build_optimizer


def loader_throughput(dataset, batch_size: int, num_workers: int, epochs: int) -> list[float]:
    """Volumes per second for each pass over ``dataset``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _batch in loader:
            pass
        rates.append(len(dataset) / (time.perf_counter() - start))
    return rates


def training_steps_per_second(preset: str, roi: int, patch: int, crops: int, steps: int) -> float:
    """Median training steps per second of MAEViT on ``crops`` random crops per step."""
    torch.manual_seed(0)
    net = mae_vit(preset, img_size=roi, patch_size=patch)
    loss_fn = MaskedReconstructionLoss(patch)
    opt = build_optimizer(net, lr=1e-4)
    images = torch.rand(crops, 1, roi, roi, roi)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = loss_fn(net(images), images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i > 0:  # first step is warm-up
            times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small volumes and network, a few seconds")
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch-size", type=int, default=2, help="volumes per step")
    parser.add_argument("--num-samples", type=int, default=2, help="crops per volume")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    shape = (96, 96, 64)
    if args.quick:
        args.volumes, args.roi, args.preset, args.steps, args.epochs, shape = 4, 32, "tiny", 2, 2, (48, 48, 32)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_dataset(root / "data", num=args.volumes, num_validation=0, shape=shape)
        items = load_datalist(root / "data", "training")
        transform = get_pretrain_transforms("ct", roi_size=args.roi, num_samples=args.num_samples)
        rows = []
        for cache in ("none", "cache", "persistent"):
            start = time.perf_counter()
            dataset = get_dataset(items, transform, cache=cache, cache_dir=root / "persistent")
            build = time.perf_counter() - start  # CacheDataset fills its cache here
            rates = loader_throughput(dataset, args.batch_size, args.num_workers, args.epochs)
            rows.append((cache, build, rates[0], statistics.median(rates[1:] if len(rates) > 1 else rates)))
        steps = training_steps_per_second(args.preset, args.roi, args.patch, args.batch_size * args.num_samples, args.steps)

    needed = steps * args.batch_size
    print(f"# bench_data: torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"# {args.volumes} phantoms {shape}, roi {args.roi}^3, {args.num_samples} crops/volume, batch {args.batch_size} volumes, "
          f"{args.num_workers} workers")  # fmt: skip
    print("| pipeline | dataset build (s) | first pass (vol/s) | later passes (vol/s) | keeps up with training? |")
    print("|---|---|---|---|---|")
    for cache, build, first, steady in rows:
        verdict = f"{'yes' if steady >= needed else 'no'} ({steady / needed:.1f}x what training consumes)"
        print(f"| {cache} | {build:.2f} | {first:.2f} | {steady:.2f} | {verdict} |")
    print(f"\nMAEViT-{args.preset} training: {steps:.3f} steps/s on {args.batch_size * args.num_samples} crops of {args.roi}^3 "
          f"-> consumes {needed:.2f} volumes/s")  # fmt: skip


if __name__ == "__main__":
    main()
