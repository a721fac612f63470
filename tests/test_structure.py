"""Package structure: no function-level imports of the package (no import cycles dodged), an import-light
``monai_mae.utils``, the package namespaces exporting the names of their modules, layering (``networks`` imports
neither ``engines`` nor ``model_file``), and one ViT encoder under ``MAEViT`` and ``ViTSeg``."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

import monai_mae
from monai_mae.networks.encoder import ViTEncoder
from monai_mae.networks.mae import MAEViT
from monai_mae.networks.vitseg import ViTSeg

PACKAGE = Path(monai_mae.__file__).parent


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


class _FunctionImports(ast.NodeVisitor):
    """Line numbers of ``import monai_mae...`` / ``from monai_mae... import`` / relative imports inside functions."""

    def __init__(self) -> None:
        self.depth, self.lines = 0, []

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        if self.depth and any(a.name.split(".")[0] == "monai_mae" for a in node.names):
            self.lines.append(node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if self.depth and (node.level > 0 or (node.module or "").split(".")[0] == "monai_mae"):
            self.lines.append(node.lineno)


def test_no_function_level_imports_of_the_package():
    """An import of ``monai_mae`` inside a function is the usual way to dodge an import cycle."""
    offenders = []
    for path in _sources():
        visitor = _FunctionImports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{line}" for line in visitor.lines]
    assert offenders == []


def _third_party(module: str) -> bool:
    """True for a module installed as a package (site-packages), False for the standard library."""
    spec = importlib.util.find_spec(module)
    origin = (spec.origin or "") if spec is not None else ""
    return "site-packages" in origin or "dist-packages" in origin


def test_utils_imports_only_the_standard_library_and_torch():
    tree = ast.parse((PACKAGE / "utils.py").read_text(encoding="utf-8"))
    modules = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert "torch" in modules and _third_party("torch") and not _third_party("json")
    assert {m for m in modules if _third_party(m) or m.startswith("monai")} == {"torch"}


@pytest.mark.parametrize(
    "module, names, home",
    [
        ("monai_mae", ["reconstruct_image", "masked_input"], "monai_mae.networks.display"),
        ("monai_mae.networks", ["extract_encoder_state_dict", "residual_stream_norm", "reconstruct_image"], None),
        ("monai_mae", ["__version__"], "monai_mae.version"),
        ("monai_mae.networks", ["VisiblePatchEmbedding"], "monai_mae.networks.patch_embed"),
    ],
)  # fmt: skip
def test_package_exports_name_their_homes(module, names, home):
    for name in names:
        value = getattr(importlib.import_module(module), name)
        if home is not None:
            assert value is getattr(importlib.import_module(home), name)


def _imported_modules(path: Path) -> set[str]:
    """Every module a source file imports at its top level or anywhere else (``import x`` and ``from x import``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_networks_import_neither_engines_nor_model_files():
    """``networks`` is the lower layer: training code (``engines``) and model files (``model_file``) build on it."""
    offenders = sorted(
        f"{path.relative_to(PACKAGE.parent)}: {module}"
        for path in sorted((PACKAGE / "networks").rglob("*.py"))
        for module in _imported_modules(path)
        if module.startswith(("monai_mae.engines", "monai_mae.model_file"))
    )
    assert offenders == []


@pytest.mark.parametrize("network", [MAEViT, ViTSeg])
def test_networks_share_one_encoder(network):
    """MAEViT and ViTSeg build, check, initialise and run their encoder through ViTEncoder, not copies of it."""
    assert issubclass(network, ViTEncoder)
    shared = {"_init_weights", "check_input", "_rope", "encode_patches"} & set(vars(ViTEncoder))
    assert shared == {"_init_weights", "check_input", "_rope", "encode_patches"}
    assert shared.isdisjoint(vars(network))
