"""``python -m monai_mae.data.preprocess DATASET_DIR OUT_DIR --modality ct|mri [options]``: see :func:`main`."""

from __future__ import annotations

from monai_mae.data.preprocess.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
