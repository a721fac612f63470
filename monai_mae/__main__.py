"""``python -m monai_mae ...``: the ``monai-mae`` command."""

from __future__ import annotations

from monai_mae.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())
