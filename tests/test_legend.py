"""One legend of dimension letters for the whole project (docs/MODEL.md, "Dimension
legend"): every module that has a legend uses only its letters, each in its meaning.

A module's legend is the block after a "Dimension legend" line of its docstring, up to
the first blank line, one entry a line: the letters (comma-separated), spaces, the
meaning. A meaning agrees with the project's when it shares one of its words (four
letters or more): "global batch" is B, "images made" is not M (filter rows).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENTRY = re.compile(r"^([A-Z][a-z]?(?:, [A-Z][a-z]?)*) +(\S.*)$")
ROW = re.compile(r"^\| ([A-Z][a-z]?(?:, [A-Z][a-z]?)*) \| ([^|]+) \|")


def _words(text: str) -> set:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4}


def project_legend() -> dict:
    """letter -> meaning, from docs/MODEL.md's table."""
    text = (REPO / "docs" / "MODEL.md").read_text()
    block = text.split("## Dimension legend", 1)[1].split("\n## ", 1)[0]
    legend = {}
    for line in block.splitlines():
        match = ROW.match(line)
        if match and match.group(1) != "letter":
            for letter in match.group(1).split(", "):
                assert letter not in legend, f"docs/MODEL.md gives {letter} twice"
                legend[letter] = match.group(2)
    return legend


def module_legend(source: str):
    """letter -> meaning from a module docstring's legend, [] of unreadable lines; None
    when the module has no legend."""
    doc = ast.get_docstring(ast.parse(source)) or ""
    lines = doc.splitlines()
    if "Dimension legend" not in lines:
        return None
    legend, unreadable = {}, []
    for line in lines[lines.index("Dimension legend") + 1:]:
        if not line.strip():
            break
        match = ENTRY.match(line.strip())
        if not match or re.search(r"\S {3,}\S", match.group(2)):   # not one entry a line
            unreadable.append(line.strip())
            continue
        for letter in match.group(1).split(", "):
            legend[letter] = match.group(2)
    return legend, unreadable


MODULES = sorted((REPO / "npdraw").rglob("*.py"))


def test_the_project_legend_reads():
    legend = project_legend()
    assert {"B", "T", "D", "Nr", "Nw", "He", "Hd", "Hs", "Z", "E", "J"} <= set(legend)


def test_the_parsers_catch_a_stray_letter_and_a_wrong_meaning():
    source = '"""x\n\nDimension legend\n    B  global batch\n    M  images made\n    Xq  what\n"""\n'
    legend, unreadable = module_legend(source)
    assert legend == {"B": "global batch", "M": "images made", "Xq": "what"} and not unreadable
    project = project_legend()
    assert _words(legend["B"]) & _words(project["B"])
    assert not _words(legend["M"]) & _words(project["M"])
    assert "Xq" not in project
    assert module_legend('"""Dimension legend\n    B  batch     T  glimpses\n"""')[1]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_a_module_legend_uses_the_project_letters_in_their_meanings(path):
    found = module_legend(path.read_text())
    if found is None:
        # a module with shapes in its docstrings needs the legend of their letters
        shapes = re.findall(r"(?<!\w)\(([A-Z][a-z]?)(?:, |,\)|\))", path.read_text())
        assert not shapes, f"{path.name} writes shapes ({shapes[0]}, ...) but has no legend"
        return
    legend, unreadable = found
    assert not unreadable, f"{path.name}: legend lines not 'LETTERS  meaning': {unreadable}"
    project = project_legend()
    unknown = sorted(set(legend) - set(project))
    assert not unknown, f"{path.name} uses letters docs/MODEL.md does not define: {unknown}"
    wrong = {k: v for k, v in legend.items() if not _words(v) & _words(project[k])}
    assert not wrong, f"{path.name} gives letters another meaning than docs/MODEL.md: {wrong}"
