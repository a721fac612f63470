"""Sphinx configuration of the monai-mae documentation (``make docs``).

Pages are Markdown (MyST); the API reference is generated from the docstrings (Google style, read by
napoleon). Every module of a package gets its own page through ``autosummary`` with ``:recursive:``, so a
module added, renamed or moved inside a package needs no change here or in ``docs/api/``.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's monai_mae, also without an editable install

from monai_mae.version import __version__  # noqa: E402

project = "monai-mae"
author = "monai-mae contributors"
copyright = "monai-mae contributors, Apache-2.0"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Markdown: ```{directive} fences, $...$ off (shapes such as (B, N, D) must stay literal), heading anchors
# so that [text](page.md#a-heading) links resolve.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# API reference: one generated page per module, members in source order, type hints in the description.
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # NamedTuple fields: autodoc documents them already

html_theme = "furo"
html_title = f"monai-mae {release}"
html_static_path: list[str] = []


def _defining_module(package: str, name: str, obj: object) -> str | None:
    """The module of ``package`` that lists ``name`` in its ``__all__`` and holds ``obj`` (not the package)."""
    owner = getattr(obj, "__module__", None)
    in_package = isinstance(owner, str) and owner.startswith(package + ".")
    if in_package and getattr(sys.modules.get(owner), name, None) is obj:
        return owner
    for mod_name, module in sorted(sys.modules.items()):
        if mod_name.startswith(package + ".") and name in getattr(module, "__all__", ()):
            if getattr(module, name, None) is obj:
                return _defining_module(mod_name, name, obj) or mod_name
    return None


def _list_package_names(app, what, name, obj, options, lines):  # noqa: ARG001 (Sphinx's signature)
    """A package's page lists its ``__all__``, each name linked to the page of the module that defines it."""
    if what != "module" or not hasattr(obj, "__path__") or not getattr(obj, "__all__", None):
        return
    lines += ["", ".. rubric:: Public names", ""]
    for public in obj.__all__:
        value = getattr(obj, public)
        where = _defining_module(name, public, value) or name
        if inspect.isclass(value) or inspect.isroutine(value):
            lines.append(f"- :py:obj:`{name}.{public} <{where}.{public}>`")
        else:  # a constant: its module's page shows it
            lines.append(f"- ``{name}.{public}`` (:py:mod:`{where}`)")
    lines.append("")


def _resolve_package_name(app, env, node, contnode):  # noqa: ARG001 (Sphinx's signature)
    """``monai_mae.data.Name`` (a package's public name) links to the module that defines ``Name``."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("monai_mae."):
        return None
    package, _, public = target.rpartition(".")
    module = sys.modules.get(package)
    if module is None or not hasattr(module, "__path__") or public not in getattr(module, "__all__", ()):
        return None
    where = _defining_module(package, public, getattr(module, public))
    if where is None:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], f"{where}.{public}", node, contnode)


def setup(app):
    app.connect("autodoc-process-docstring", _list_package_names)
    app.connect("missing-reference", _resolve_package_name)
