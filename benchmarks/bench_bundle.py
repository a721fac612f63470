"""Throughput of the ``mae_pretrain`` bundle's trainer against the bare training loop, on the same cached batches.

The bundle (``train.json``, parsed with ``monai.bundle.ConfigParser``) builds its network, optimizer, scheduler,
per-iteration handlers (lr schedule, NaN guard, GradScaler choice, gradient clipping, stats and TensorBoard
logging, lr logging) and MONAI's ``SupervisedTrainer``. The training batches are drawn once from its DataLoader
and kept in memory, so neither side pays for loading. Then, from the same initial weights:

* ``bundle``: the trainer runs ``--steps`` iterations over those batches (validation off);
* ``bare loop``: a plain PyTorch loop over the same batches: forward, the same loss, backward, clipping, AdamW
  step, scheduler step;
* ``bare loop, MetaTensor inputs``: the same loop fed the loader's ``MetaTensor``s instead of plain tensors (what
  the network got before the bundles' batch hooks dropped the metadata).

Prints iterations/s of each (median of ``--repeats`` timed runs after a warm-up) and the bundle / bare ratio; the
target is a bundle within 10% of the bare loop. CPU by default; ``--device cuda`` times a GPU (synchronised).

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_bundle.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from monai_mae.data import write_synthetic_dataset
from monai_mae.engines import build_optimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared helpers
from bench_common import median_seconds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "mae_pretrain" / "configs"

__all__ = ["bundle_parser", "bare_loop", "main"]


def bundle_parser(data: Path, out: Path, args: argparse.Namespace) -> ConfigParser:
    """``train.json`` with the benchmark's sizes; validation, progress bar and resuming off."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({
        "bundle_root": str(CONFIGS.parent), "dataset_dir": str(data), "output_dir": str(out), "device": args.device,
        "roi_size": [args.size] * 3, "patch_size": [args.patch] * 3, "batch_size": args.batch_size, "num_samples": 1,
        "num_workers": 0, "max_epochs": 1, "val_interval": 10**6, "progress_bar": False, "resume": False,
        "warmup_epochs": 1, "network_def#hidden_size": args.hidden, "network_def#mlp_dim": 4 * args.hidden,
        "network_def#num_layers": args.layers, "network_def#num_heads": max(1, args.hidden // 64),
        "network_def#decoder_hidden_size": args.hidden // 2, "network_def#decoder_mlp_dim": 2 * args.hidden,
        "network_def#decoder_num_layers": 1, "network_def#decoder_num_heads": max(1, args.hidden // 128),
        # the final model file is written once per run, not per iteration: left out of the timed runs
        "train#trainer#train_handlers": "$[h for h in @train#handlers if type(h).__name__ != 'FinalModelSaver']",
    })  # fmt: skip
    return parser


def bare_loop(network, loss_fn, optimizer, scheduler, batches, max_norm: float, plain: bool) -> Callable[[], None]:
    """One pass of the plain training loop over ``batches`` (``plain``: drop MONAI's metadata first)."""

    def run() -> None:
        network.train()
        for batch in batches:
            images = batch["image"].as_tensor() if plain else batch["image"]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(network(images), images)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), max_norm)
            optimizer.step()
            scheduler.step()

    return run


def _timed(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``run`` after one untimed call."""
    run()
    return median_seconds(run, repeats, device)


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--device", default="cpu")
    cli.add_argument("--size", type=int, default=64, help="crop side (default 64)")
    cli.add_argument("--patch", type=int, default=16)
    cli.add_argument("--hidden", type=int, default=192, help="encoder width (default 192; 64 per head)")
    cli.add_argument("--layers", type=int, default=4)
    cli.add_argument("--batch-size", type=int, default=2)
    cli.add_argument("--steps", type=int, default=10, help="iterations per timed run (default 10)")
    cli.add_argument("--repeats", type=int, default=3)
    args = cli.parse_args(argv)
    device = torch.device(args.device)
    logging.disable(logging.WARNING)  # the StatsHandler still formats its line each iteration, as in a real run

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_dataset(data, num=args.batch_size * args.steps + 1, num_validation=1, shape=(80, 80, 72))
        parser = bundle_parser(data, Path(tmp) / "out", args)
        for index in range(len(parser.get("initialize"))):
            parser.get_parsed_content(f"initialize#{index}")
        batches = list(parser.get_parsed_content("train#dataloader"))[: args.steps]
        network = parser.get_parsed_content("network")
        start_state = copy.deepcopy(network.state_dict())
        trainer = parser.get_parsed_content("train#trainer")
        trainer.data_loader = batches  # cached: neither side loads data
        trainer.state.epoch_length = len(batches)

        def run_bundle() -> None:
            trainer.state.max_epochs = trainer.state.epoch + 1
            trainer.run()

        bundle_s = _timed(run_bundle, device, args.repeats)
        parser.get_parsed_content("tb_writer").close()

        results = {"bundle (SupervisedTrainer + handlers)": bundle_s}
        for plain, name in ((True, "bare loop"), (False, "bare loop, MetaTensor inputs")):
            net = copy.deepcopy(network)
            net.load_state_dict(start_state)
            optimizer = build_optimizer(net, lr=parser["lr"], weight_decay=parser["weight_decay"])
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            loss_fn = parser.get_parsed_content("loss")
            results[name] = _timed(bare_loop(net, loss_fn, optimizer, scheduler, batches, parser["grad_clip"], plain),
                                   device, args.repeats)  # fmt: skip
    assert all(isinstance(b["image"], MetaTensor) for b in batches)  # the loader's output, as in a real run
    print(f"mae_pretrain, {device.type}, ViT {args.hidden} x {args.layers}, {args.size}^3 crops, "
          f"{args.patch}^3 patches, "
          f"batch {args.batch_size}, {len(batches)} iterations per run, median of {args.repeats}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print("| loop | it/s | ms/it |\n| --- | --- | --- |")
    for name, seconds in results.items():
        print(f"| {name} | {len(batches) / seconds:.2f} | {1000 * seconds / len(batches):.1f} |")
    ratio = results["bundle (SupervisedTrainer + handlers)"] / results["bare loop"]
    verdict = "within" if ratio <= 1.10 else "outside"
    print(f"bundle / bare loop time per iteration: {ratio:.3f} ({verdict} the 10% target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
