"""monai-mae: masked-autoencoder pretraining of vision transformers on CT and MRI, as a MONAI plugin."""

from __future__ import annotations

__version__ = "0.1.0"
