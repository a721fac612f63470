"""The documentation: a short README, Markdown links that resolve, every page in the site's table of contents.

The site itself is built by ``make docs`` (Sphinx, warnings as errors), which ``.ci/run`` runs after the tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bundle_utils import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
MARKDOWN_FILES = sorted(
    [README, REPO / "benchmarks" / "README.md", *DOCS.glob("*.md"), *(REPO / "bundles").glob("*/docs/README.md")]
)

#: ``[text](target)`` and ``![alt](target)``; the target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def markdown_links(text: str) -> list[tuple[int, str]]:
    """``(line number, target)`` of every Markdown link outside code blocks and inline code."""
    links, in_fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        links += [(number, match.group(1)) for match in LINK.finditer(line)]
    return links


def heading_anchors(text: str, folder: Path | None = None) -> set[str]:
    """The anchors GitHub (and MyST's ``myst_heading_anchors``) give the headings of a Markdown file.

    With ``folder``, a MyST ``{include}`` of another file (relative to ``folder``) adds that file's anchors.
    """
    anchors, in_fence = set(), False
    for line in text.splitlines():
        include = re.match(r"^```\{include\}\s+(\S+)", line.strip())
        if include and folder is not None:
            anchors |= heading_anchors((folder / include.group(1)).read_text(encoding="utf-8"))
        if FENCE.match(line.strip()):
            in_fence = not in_fence
        elif not in_fence and re.match(r"^#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def relative_links(path: Path) -> list[tuple[int, str]]:
    return [(n, t) for n, t in markdown_links(path.read_text(encoding="utf-8")) if not re.match(r"^[a-z]+:", t)]


def test_link_and_anchor_parsing():
    text = "see [a](x.md#b-c) and ![pic](img/p.png), not `[code](nope.md)` nor\n```\n[in](fence.md)\n```\n# B, c!\n"
    assert markdown_links(text) == [(1, "x.md#b-c"), (1, "img/p.png")]
    assert heading_anchors(text) == {"b-c"}
    assert heading_anchors("## `bench_data.py`: can the data path feed a GPU?") == {
        "bench_datapy-can-the-data-path-feed-a-gpu"
    }
    assert "headline-figures" in heading_anchors((DOCS / "benchmarks.md").read_text("utf-8"), DOCS)  # included


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move reference text to docs/"


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files_and_headings(path):
    broken = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{path.relative_to(REPO)}:{number}: {target} (no file {resolved})")
        elif (
            anchor
            and resolved.suffix == ".md"
            and anchor not in heading_anchors(resolved.read_text("utf-8"), resolved.parent)
        ):
            broken.append(f"{path.relative_to(REPO)}:{number}: {target} (no heading #{anchor})")
    assert broken == []


def test_the_link_check_sees_links():
    """The files above do link to each other, so an empty result means the links resolve, not that none were found."""
    targets = {target for _, target in relative_links(README)}
    assert {"docs/library.md", "docs/bundles.md", "benchmarks/README.md"} <= targets


def test_every_page_is_in_the_table_of_contents():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    toctree = index.split("```{toctree}", 1)[1].split("```", 1)[0]
    entries = {line.strip() for line in toctree.splitlines() if line.strip() and not line.strip().startswith(":")}
    pages = {p.stem for p in DOCS.glob("*.md")} - {"index"}
    assert sorted(pages - entries) == []
    assert "api/index" in entries


def test_docs_speak_of_the_software():
    """No sentence about how the work was organised: facts such as "not yet measured on a GPU" instead."""
    phrases = ("the issue", "available to us", "lent to this task", "this session", "no cpu time left")
    found = [
        f"{path.relative_to(REPO)}: {phrase!r}"
        for path in MARKDOWN_FILES
        for phrase in phrases
        if phrase in path.read_text(encoding="utf-8").lower()
    ]
    assert found == []


def test_readme_quotes_the_current_pretraining_results():
    """The README's headline Dice figures are those of ``benchmarks/results/pretrain_benefit_combined.md``."""
    table = (REPO / "benchmarks" / "results" / "pretrain_benefit_combined.md").read_text(encoding="utf-8")
    rows = {}
    for line in table.split("\n\n")[0].splitlines():  # the first table: every architecture and arm
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].isdigit():
            rows[int(cells[0])] = [c.split(" ")[0] for c in cells[1:]]
    assert all(re.fullmatch(r"0\.\d{3}", rows[size][column]) for size in (2, 4) for column in (0, 1, 3, 4))
    readme = README.read_text(encoding="utf-8")
    expected = [
        f"from scratch {rows[2][3]} / {rows[4][3]}, MAE-pretrained {rows[2][4]} / {rows[4][4]}",
        f"UNETR {rows[2][0]} → {rows[2][1]} and {rows[4][0]} → {rows[4][1]}",
    ]
    for sentence in expected:
        assert sentence in " ".join(readme.split()), sentence


def test_make_docs_builds_with_warnings_as_errors_in_ci():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "docs: $(DOCS_STAMP)\n\t$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html\n" in makefile
    assert '-e ".[test,docs]"' in makefile
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert lines.index("set -euo pipefail") < lines.index("make test") < lines.index("make docs")
    assert lines.index("make docs") < lines.index("make wheel-smoke")
    assert "/docs/_build/" in (REPO / ".gitignore").read_text().splitlines()
