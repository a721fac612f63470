"""What a wheel install gets: the package with everything it reads at run time, and CI that checks it.

The full check (fresh venv, install, a bundle epoch from outside the repository) is ``.ci/wheel_smoke.sh``
(``make wheel-smoke``), run by ``.ci/run`` after the test suite.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from bundle_utils import REPO


@pytest.mark.slow
def test_wheel_carries_every_module_and_the_data_presets(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "monai_mae", src / "monai_mae", ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(src),
           "-w", str(tmp_path / "dist")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("monai_mae-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(src).as_posix() for p in (src / "monai_mae").rglob("*") if p.suffix in (".py", ".json")}
    assert {"monai_mae/data/presets/ct.json", "monai_mae/data/presets/mri.json"} <= expected
    assert sorted(expected - names) == []
    from monai_mae.version import __version__

    assert wheel.name.startswith(f"monai_mae-{__version__}-")  # the version has one source, monai_mae/version.py


def test_ci_runs_the_suite_then_the_wheel_smoke_test():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert lines.index("make test") < lines.index("make wheel-smoke")
    makefile = (REPO / "Makefile").read_text()
    assert "wheel-smoke:\n\tPYTHON=$(PYTHON) bash .ci/wheel_smoke.sh\n" in makefile
    assert 'test-quick: install\n\tOMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(QUICK_WORKERS) -m "not slow" tests\n' in makefile
    assert "test: install\n\t$(BIN)/python -m pytest -q tests\n" in makefile  # CI: one process, everything
