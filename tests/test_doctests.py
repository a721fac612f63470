"""The ``>>>`` examples in the package's docstrings run, with the outputs they show.

Every module of ``monai_mae`` is searched (so ``make test`` and ``make test-quick`` both run them);
examples use tiny sizes. Examples that cannot run here (they need files from a training run, a GPU,
or a full-size network) are plain code blocks without prompts.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import monai_mae

MODULES = sorted(info.name for info in pkgutil.walk_packages(monai_mae.__path__, "monai_mae."))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _doctests(name: str) -> list[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(importlib.import_module(name), name) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    for test in _doctests(name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_the_examples_are_found():
    """The search itself works: the public API's examples are among those run."""
    found = {test.name for name in MODULES for test in _doctests(name)}
    assert {"monai_mae.networks.patching.patchify", "monai_mae.networks.mae.MAEViT",
            "monai_mae.networks.transfer.load_mae_encoder"} <= found  # fmt: skip
