"""Generation time of one synthetic phantom per style and size, on one thread; optionally a picture of one.

Times :func:`monai_mae.data.make_phantom` for each ``--shapes`` entry in both styles (``simple`` and
``realistic``, 9 labelled organs), ``--repeats`` seeds each, with numpy and torch limited to one thread
(set ``OMP_NUM_THREADS=1`` too), and prints the median seconds per volume. ``--picture PATH`` writes
an axial, coronal and sagittal slice of one realistic phantom with its label overlay (matplotlib needed);
``--picture`` alone writes ``benchmarks/figures/realistic_phantom.png``.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_phantoms.py --shapes 128,128,48 256,256,64
    OMP_NUM_THREADS=1 python benchmarks/bench_phantoms.py --shapes 128,128,48 --repeats 1 \\
        --picture docs/images/realistic_phantom.png
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch

from monai_mae.data import REALISTIC_ORGANS, make_phantom, realistic_spacing
from monai_mae.engines.pictures import require_matplotlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared helpers
from bench_common import FIGURES, median_seconds  # noqa: E402

__all__ = ["main", "phantom_picture", "time_phantom"]


def time_phantom(shape: Sequence[int], style: str, repeats: int) -> float:
    """Median wall-clock seconds of ``make_phantom(shape, seed, style=style)`` over ``repeats`` seeds."""
    organs = len(REALISTIC_ORGANS) if style == "realistic" else 5
    layout = "anatomical"
    seeds = iter(range(repeats))
    return median_seconds(lambda: make_phantom(shape, next(seeds), organs, layout, style=style), repeats)


def phantom_picture(shape: Sequence[int], seed: int, path: str) -> None:
    """Write axial, coronal and sagittal slices of one realistic phantom, without and with its labels, to ``path``."""
    figure_cls, canvas_cls = require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    image, label = make_phantom(shape, seed, len(REALISTIC_ORGANS), style="realistic")
    sx, sy, sz = realistic_spacing(shape)
    nx, ny, nz = image.shape
    z, y, x = nz // 2, ny // 2 - ny // 10, nx // 2 + nx // 6
    # (title, image slice, label slice, pixel aspect), drawn with origin="lower"; x reversed so that the
    # patient's right is on the left, as CT is read
    cuts = [
        (f"axial z={z}", image[::-1, :, z].T, label[::-1, :, z].T, sy / sx),
        (f"coronal y={y}", image[::-1, y, :].T, label[::-1, y, :].T, sz / sx),
        (f"sagittal x={x}", image[x].T, label[x].T, sz / sy),
    ]
    cmap = colormaps["tab10"]
    figure = figure_cls(figsize=(12.0, 7.2), dpi=80, layout="constrained")
    axes = figure.subplots(2, 3)
    for column, (title, grey, labels, aspect) in enumerate(cuts):
        for row in range(2):
            ax = axes[row, column]
            ax.imshow(grey, cmap="gray", vmin=-160, vmax=240, origin="lower", aspect=aspect, interpolation="nearest")
            if row:
                rgba = cmap(labels % 10)
                rgba[..., 3] = np.where(labels > 0, 0.45, 0.0)
                ax.imshow(rgba, origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_title(f"{title}" + (" + labels" if row else ""), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(color=cmap(k % 10), label=f"{k} {name}") for k, name in enumerate(REALISTIC_ORGANS, start=1)]
    figure.legend(handles=handles, loc="outside lower center", ncols=9, fontsize=8, frameon=False)
    figure.suptitle(f"realistic phantom {tuple(shape)}, seed {seed}, window -160..240 HU", fontsize=10)
    canvas_cls(figure).print_png(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; prints one line per style and shape."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["128,128,48", "256,256,64"], help="X,Y,Z of each size")
    parser.add_argument("--repeats", type=int, default=3, help="seeds timed per style and shape (median shown)")
    parser.add_argument(
        "--picture",
        nargs="?",
        const=str(FIGURES / "realistic_phantom.png"),
        default=None,
        help="write a picture of the first shape's realistic phantom to this file (--picture alone: "
        "benchmarks/figures/realistic_phantom.png)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the pictured phantom")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shapes = [tuple(int(v) for v in text.split(",")) for text in args.shapes]
    for shape in shapes:
        spacing = ", ".join(f"{s:.2f}" for s in realistic_spacing(shape))
        for style in ("simple", "realistic"):
            seconds = time_phantom(shape, style, args.repeats)
            size = "x".join(map(str, shape))
            print(
                f"{style:9s} {size:>11s}: {seconds:6.2f} s per volume (median of {args.repeats}; "
                f"realistic spacing {spacing} mm)"
            )
    if args.picture:
        phantom_picture(shapes[0], args.seed, args.picture)
        print(f"wrote {args.picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
