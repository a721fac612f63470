"""Preprocess once: the deterministic transforms of a data preset applied to every volume, stored for random crops.

At scale, loading, reorienting and resampling each CT or MRI volume every time a crop is drawn
costs more than the training step. ``python -m monai_mae.data.preprocess DATASET_DIR OUT_DIR
--modality ct`` applies the deterministic part of a data preset (the chain of
:func:`~monai_mae.data.get_pretrain_transforms` up to, not including, its padding and random crops:
load, channel first, RAS orientation, resampling to the preset's ``pixdim``, CT window to [0, 1] or
MRI normalisation, foreground crop with a small margin) once per volume and writes:

* ``OUT_DIR/images/<name>.npy``: the image, float16, shape (C, X, Y, Z);
* ``OUT_DIR/labels/<name>.npy``: the label (when the datalist has one), uint8, shape (1, X, Y, Z);
* ``OUT_DIR/manifest.json``: format and package version, the resolved preset, and per volume its
  split, source files, output files and sizes, shape, spacing, original affine and shape, and
  intensity statistics; volumes rejected by the input checks are listed under ``"skipped"``. While a
  run is in progress, finished volumes are appended to ``OUT_DIR/manifest.journal`` (one JSON line
  each) and compacted into ``manifest.json`` at its end.

Why ``.npy`` in float16: ``np.load(path, mmap_mode="r")`` maps the file without reading it, and
slicing a crop out of the map reads only the disk pages that hold the crop's rows, so a random
96^3 crop of a 512 x 512 x 300 CT costs a few MB of I/O, not the whole volume. The arrays are
stored in Fortran (column-major) order, so the logical shape stays (C, X, Y, Z) and an axial slice
(the last axis) is one contiguous block. Chunked, compressed formats (Zarr, HDF5) would cut the
disk space further but need an extra dependency; ``.npy`` needs only numpy. CT is stored after the
window, in [0, 1], where float16 keeps a relative precision of 2^-11 (an absolute error below
2.5e-4, about 0.1 HU of a 425 HU window), at half the bytes of float32; labels are class indices,
uint8. MRI z-scores are stored in float16 too (``--image-dtype float32`` keeps full precision).

The stages, one module each:

* :mod:`~monai_mae.data.preprocess.settings`: the resolved preset (:func:`preprocess_settings`) and
  the deterministic chain (:func:`get_deterministic_transforms`);
* :mod:`~monai_mae.data.preprocess.checks`: input checks and the disk-space estimate;
* :mod:`~monai_mae.data.preprocess.writer`: one volume transformed and written;
* :mod:`~monai_mae.data.preprocess.manifest`: the manifest and its journal (:func:`read_manifest`,
  :func:`check_manifest`);
* :mod:`~monai_mae.data.preprocess.runner`: the run (:func:`preprocess_dataset`);
* :mod:`~monai_mae.data.preprocess.cli`: the command line (:func:`main`).

Training reads such a folder with :class:`~monai_mae.data.PreprocessedCropDataset`
(:mod:`monai_mae.data.crops`); :func:`check_manifest` stops a run whose data preset differs from
the one the folder was made with.
"""

from __future__ import annotations

from monai_mae.data.preprocess.cli import main
from monai_mae.data.preprocess.manifest import FORMAT_VERSION, MANIFEST_NAME, check_manifest, read_manifest
from monai_mae.data.preprocess.runner import preprocess_dataset
from monai_mae.data.preprocess.settings import FOREGROUND_MARGIN, get_deterministic_transforms, preprocess_settings

__all__ = [
    "FOREGROUND_MARGIN",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "check_manifest",
    "get_deterministic_transforms",
    "main",
    "preprocess_dataset",
    "preprocess_settings",
    "read_manifest",
]
