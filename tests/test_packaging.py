"""What a wheel install gets: the package with everything it reads at run time (data presets, the bundles),
the ``monai-mae`` console script, and CI that checks it.

The full check (fresh venv, install, ``monai-mae synth``, ``pretrain``, ``finetune`` and ``export`` from outside
the repository) is ``.ci/wheel_smoke.sh`` (``make wheel-smoke``), run by ``.ci/run`` after the test suite.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from bundle_utils import REPO

from monai_mae.version import __version__


@pytest.mark.slow
def test_wheel_carries_every_module_and_the_data_presets(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for folder in ("monai_mae", "bundles"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(src),
           "-w", str(tmp_path / "dist")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("monai_mae-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(src).as_posix() for p in (src / "monai_mae").rglob("*") if p.suffix in (".py", ".json")}
    assert {"monai_mae/data/presets/ct.json", "monai_mae/data/presets/mri.json"} <= expected
    assert sorted(expected - names) == []
    bundles = src / "bundles"
    bundle_files = {f"monai_mae/bundles/{p.relative_to(bundles).as_posix()}" for p in bundles.rglob("*") if p.is_file()}
    assert sorted(bundle_files - names) == []  # every file of the bundles, under monai_mae/bundles
    assert "monai_mae/bundles/mae_finetune/configs/evaluate.json" in names
    info = wheel.name.split("-py3")[0]
    entry_points = zipfile.ZipFile(wheel).read(f"{info}.dist-info/entry_points.txt").decode()
    assert "[console_scripts]\nmonai-mae = monai_mae.cli:main" in entry_points
    meta = zipfile.ZipFile(wheel).read(f"{info}.dist-info/METADATA").decode()
    assert "Requires-Python: >=3.11" in meta and "License-Expression: Apache-2.0" in meta and "pillow" not in meta
    assert wheel.name.startswith(f"monai_mae-{__version__}-")  # the version has one source, monai_mae/version.py


def test_ci_runs_the_suite_then_the_wheel_smoke_test():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert lines.index("make test") < lines.index("make wheel-smoke")
    makefile = (REPO / "Makefile").read_text()
    assert "wheel-smoke:\n\tPYTHON=$(PYTHON) bash .ci/wheel_smoke.sh\n" in makefile
    assert (
        'test-quick: install\n\tOMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(QUICK_WORKERS) -m "not slow" tests\n'
        in makefile
    )
    assert (  # CI: everything, the slow tests included, on xdist workers
        "test: install\n\tOMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n $(TEST_WORKERS) "
        "--dist worksteal tests\n" in makefile
    )


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_and_the_bundles_ship_from_their_top_level_folder():
    """The package list is explicit (the bundles are a mapped package): a new subpackage must be added to it."""
    setup = _pyproject()["tool"]["setuptools"]
    inits = (REPO / "monai_mae").rglob("__init__.py")
    folders = {p.parent.relative_to(REPO).as_posix().replace("/", ".") for p in inits}
    listed = set(setup["packages"])
    assert folders <= listed and "monai_mae.data.presets" in listed
    assert setup["package-dir"] == {"monai_mae.bundles": "bundles"}
    bundle_packages = {p for p in listed if p.startswith("monai_mae.bundles.")}
    on_disk = {
        "monai_mae.bundles." + p.relative_to(REPO / "bundles").as_posix().replace("/", ".")
        for p in (REPO / "bundles").rglob("*")
        if p.is_dir() and "__pycache__" not in p.parts
    }
    assert bundle_packages == on_disk
    for package, patterns in setup["package-data"].items():
        folder = REPO / "bundles" / package.split(".", 2)[2].replace(".", "/") if "bundles." in package else None
        if folder is not None:  # every file of a bundle folder matches its patterns
            files = [p for p in folder.iterdir() if p.is_file()]
            assert sorted(p.name for p in files if not any(p.match(g) for g in patterns)) == []


def test_console_script_build_requirement_and_declared_floors():
    project = _pyproject()["project"]
    assert project["scripts"] == {"monai-mae": "monai_mae.cli:main"}
    assert project["license"] == "Apache-2.0" and _pyproject()["build-system"]["requires"] == ["setuptools>=77"]
    assert project["requires-python"] == ">=3.11"  # what CI tests: python 3.11, torch 2.13, MONAI 1.6
    assert {"torch>=2.13", "monai[fire]>=1.6"} <= set(project["dependencies"])
    assert not any(d.lower().startswith("pillow") for d in project["dependencies"])  # matplotlib (plots) brings it
    assert (REPO / "LICENSE").read_text() == (REPO / "bundles" / "mae_pretrain" / "LICENSE").read_text()
    assert f"## {__version__}" in (REPO / "CHANGELOG.md").read_text()
