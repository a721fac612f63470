"""``python -m monai_mae.data.preprocess DATASET_DIR OUT_DIR --modality ct|mri [options]``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from monai_mae.data.preprocess.manifest import MANIFEST_NAME
from monai_mae.data.preprocess.runner import default_workers, preprocess_dataset
from monai_mae.data.preprocess.settings import FOREGROUND_MARGIN, IMAGE_DTYPES
from monai_mae.data.transforms import MODALITIES

__all__ = ["main"]


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Apply the deterministic transforms of a data preset once to every volume of a Decathlon "
        "datalist and store them as .npy files for random-crop training (resumable).",
    )
    parser.add_argument("dataset_dir", help="folder with datalist.json, or an nnU-Net raw folder")
    parser.add_argument("out_dir", help="output folder (images/, labels/, manifest.json)")
    parser.add_argument("--modality", required=True, choices=MODALITIES)
    parser.add_argument("--preset", default=None, help="data preset name or JSON path (default: the modality's preset)")
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="worker processes (default: min(8, CPUs))"
    )
    parser.add_argument("--skip-bad", action="store_true", help="skip bad inputs with a warning instead of stopping")
    parser.add_argument(
        "--spacing", type=float, nargs="+", default=None, metavar="MM", help="override pixdim (1 or 3 numbers, mm)"
    )
    parser.add_argument("--margin", type=int, default=FOREGROUND_MARGIN, help="voxels kept around the foreground box")
    parser.add_argument("--in-channels", type=int, default=1, help="channels per image (default 1)")
    parser.add_argument("--image-dtype", choices=IMAGE_DTYPES, default="float16")
    parser.add_argument("--no-labels", action="store_true", help="store the images only")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m monai_mae.data.preprocess") -> int:
    """``python -m monai_mae.data.preprocess DATASET_DIR OUT_DIR --modality ct|mri [options]``.

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.
        prog: the program name in usage and error messages (``monai-mae preprocess`` from the command).

    Returns:
        0 on success; errors are reported by ``argparse`` (exit status 2) naming the problem.
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.spacing is not None and len(args.spacing) not in (1, 3):
        parser.error(f"--spacing takes 1 or 3 numbers, got {args.spacing}.")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("monai_mae.data.preprocess").setLevel(logging.INFO)
    try:
        manifest = preprocess_dataset(
            args.dataset_dir,
            args.out_dir,
            args.modality,
            preset=args.preset,
            workers=args.workers,
            skip_bad=args.skip_bad,
            spacing=args.spacing,
            margin=args.margin,
            in_channels=args.in_channels,
            image_dtype=args.image_dtype,
            labels=not args.no_labels,
        )
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        parser.error(str(err))
    print(f"preprocessed {len(manifest['volumes'])} volume(s) into {Path(args.out_dir)}; manifest: {MANIFEST_NAME}")
    return 0
