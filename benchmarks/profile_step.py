"""Profile one training step of a ``bench_vs_monai`` config with ``torch.profiler`` (CPU).

Builds the model, optimiser, loss and input exactly as ``bench_vs_monai.py`` does, runs ``--warmup``
untimed steps, then profiles ``--steps`` steps and prints the operators that take the time (self
CPU time, summed over the profiled steps), so that a slow step can be traced to its copies, norms,
activations, attention or matmuls.

Examples::

    python benchmarks/profile_step.py --config c --threads 1
    python benchmarks/profile_step.py --config b --model monai --threads 2 --rows 40
    python benchmarks/profile_step.py --config c --bf16            # under CPU bf16 autocast
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_vs_monai import CONFIGS, MONAI, OURS, build_model, make_input, make_optimizer, train_step  # noqa: E402

from monai_mae import MaskedReconstructionLoss  # noqa: E402

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="c", choices=sorted(CONFIGS), help="bench_vs_monai config (default c)")
    parser.add_argument("--model", default=OURS, choices=(OURS, MONAI), help="which network (default monai_mae)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steps", type=int, default=1, help="profiled steps (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--rows", type=int, default=30, help="operators to print (default 30)")
    parser.add_argument("--bf16", action="store_true", help="run the step under torch.autocast('cpu', bfloat16)")
    parser.add_argument("--shapes", action="store_true", help="group operators by input shapes too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="torch.meshgrid")

    config = CONFIGS[args.config]
    model = build_model(config, args.model)
    optimizer = make_optimizer(model, fused=True)
    loss_fn = MaskedReconstructionLoss(config.patch_size, spatial_dims=3)
    images = make_input(config)

    def step() -> float:
        return train_step(model, optimizer, loss_fn, images, config.masking_ratio, bf16=args.bf16)

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
    elapsed = (time.perf_counter() - start) / args.steps
    print(
        f"config {config.name}, {args.model}, {args.threads} thread(s), bf16={args.bf16}: {elapsed:.3f} s/step (profiled)"
    )
    table = prof.key_averages(group_by_input_shape=args.shapes)
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
