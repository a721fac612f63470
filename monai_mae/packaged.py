"""Where the MONAI bundles live: inside the installed package, or in the source checkout.

The repository keeps the bundles at its top level (``bundles/mae_pretrain``, ``bundles/mae_finetune``);
the wheel carries the same folders as package data under ``monai_mae/bundles/`` (setuptools
``package-dir`` maps ``monai_mae.bundles`` to ``bundles``). :func:`bundle_dir` looks in the package
first and then next to it, so one call works for a wheel, an editable install and a checkout on
``PYTHONPATH``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLE_NAMES", "bundle_dir", "bundle_file", "bundles_root"]

#: The bundles that ship with the package.
BUNDLE_NAMES = ("mae_pretrain", "mae_finetune")

_PACKAGE = Path(__file__).resolve().parent


def bundles_root() -> Path:
    """The folder holding the bundles: ``monai_mae/bundles`` in an installed wheel, else the checkout's ``bundles``.

    Raises:
        FileNotFoundError: when neither folder holds the bundles (a broken install).
    """
    for root in (_PACKAGE / "bundles", _PACKAGE.parent / "bundles"):
        if all((root / name / "configs" / "metadata.json").is_file() for name in BUNDLE_NAMES):
            return root
    raise FileNotFoundError(
        f"the monai-mae bundles are neither in {_PACKAGE / 'bundles'} (installed wheel) nor in "
        f"{_PACKAGE.parent / 'bundles'} (source checkout); reinstall monai-mae."
    )


def bundle_dir(name: str) -> Path:
    """The root folder of the bundle ``name`` (``configs/``, ``docs/``, ``LICENSE``).

    Args:
        name: one of :data:`BUNDLE_NAMES`.

    Raises:
        ValueError: for an unknown name.

    Examples::

        >>> bundle_dir("mae_pretrain").name
        'mae_pretrain'
    """
    if name not in BUNDLE_NAMES:
        raise ValueError(f"unknown bundle {name!r}; the package ships {', '.join(BUNDLE_NAMES)}.")
    return bundles_root() / name


def bundle_file(name: str, relative: str) -> Path:
    """A file of the bundle ``name``, e.g. ``bundle_file("mae_finetune", "configs/train.json")``.

    Raises:
        ValueError: for an unknown bundle name.
        FileNotFoundError: when the bundle has no such file.
    """
    path = bundle_dir(name) / relative
    if not path.is_file():
        raise FileNotFoundError(f"bundle {name} has no file {relative} (looked at {path}).")
    return path
