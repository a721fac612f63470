"""The package version (one tiny module, so anything can read it without importing the package's networks)."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.3.0"
