"""docs/MODEL.md names real code: every function in backticks exists, and every equation
row names a reference function and a fast-path function."""
import dataclasses
import importlib
import re

import pytest

import npdraw
from conftest import REPO_ROOT

MODEL_MD = REPO_ROOT / "docs" / "MODEL.md"
IDENTIFIER = r"[A-Za-z_][A-Za-z_0-9]*"


def _resolve(dotted):
    """`module.attr...` under npdraw (or `cfg.field` / `DrawConfig.field`) -> the object;
    raises AttributeError or ImportError when it does not exist."""
    parts = dotted.split(".")
    if parts[0] == "npdraw":
        parts = parts[1:]
    if parts[0] in ("cfg", "DrawConfig"):
        obj, parts = npdraw.DrawConfig(), parts[1:]
    elif hasattr(npdraw, parts[0]) and not parts[0].startswith("_"):
        obj, parts = getattr(npdraw, parts[0]), parts[1:]
    else:
        obj, parts = importlib.import_module(f"npdraw.{parts[0]}"), parts[1:]
    for part in parts:
        if not hasattr(obj, part):     # a submodule not imported by its package yet
            importlib.import_module(f"{obj.__name__}.{part}")
        obj = getattr(obj, part)
    return obj


def _backticked(text):
    return re.findall(r"`([^`\n]+)`", text)


def test_every_backticked_name_in_model_md_exists():
    text = MODEL_MD.read_text()
    known_bare = (set(npdraw.param_shapes(npdraw.DrawConfig(peepholes=True)))
                  | {f.name for f in dataclasses.fields(npdraw.DrawConfig)}
                  | set(dir(npdraw)) | set(dir(npdraw.model)))
    checked, missing = 0, []
    for token in _backticked(text):
        if re.fullmatch(rf"{IDENTIFIER}(\.{IDENTIFIER})+", token):
            try:
                _resolve(token)
            except (AttributeError, ImportError):
                missing.append(token)
            checked += 1
        elif re.fullmatch(IDENTIFIER, token):
            if token not in known_bare:
                missing.append(token)
            checked += 1
        elif re.fullmatch(r"[\w./-]+\.(py|md)", token):
            if not (REPO_ROOT / token).is_file():
                missing.append(token)
            checked += 1
    assert not missing, f"docs/MODEL.md names what does not exist: {sorted(set(missing))}"
    assert checked > 50   # the table was read at all


def test_every_equation_row_names_both_implementations():
    rows = [line for line in MODEL_MD.read_text().splitlines()
            if re.match(r"\| (\d|BPTT)", line)]
    assert len(rows) >= 20
    for row in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert len(cells) == 4, row
        reference, fast = cells[2], cells[3]
        assert any("." in t for t in _backticked(reference)), f"no reference function: {row}"
        assert any("." in t for t in _backticked(fast)), f"no fast-path function: {row}"


@pytest.mark.parametrize("token", ["reference.draw.no_such_step", "engine.not_here",
                                   "no_such_module.f"])
def test_a_wrong_name_is_caught(token):
    with pytest.raises((AttributeError, ImportError)):
        _resolve(token)


def test_the_readme_python_example_runs(monkeypatch, capsys):
    """README's "From Python": npdraw.load, then sample, score and reconstruct."""
    import numpy as np
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks and "npdraw.load(" in blocks[0]
    monkeypatch.chdir(REPO_ROOT)
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["images"].shape == (16, 28, 28)
    assert np.abs(scope["reconstruction"] - scope["x"]).mean() < 0.1
    assert np.isfinite(scope["loss"]).all() and capsys.readouterr().out


def test_design_md_names_every_module():
    """docs/DESIGN.md's rooms name every module of npdraw (a subpackage's under its
    folder), so a new room cannot go undrawn."""
    rooms = (REPO_ROOT / "docs" / "DESIGN.md").read_text().split("## Rooms", 1)[1]
    rooms = rooms.split("\n## ", 1)[0]
    words = set(re.findall(r"[\w.]+/?", rooms))
    package = REPO_ROOT / "npdraw"
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        folder = f"{rel.parent}/" if rel.parent.name else None
        if rel.name == "__init__.py" and folder:      # a subpackage: its folder's line
            wanted = [folder]
        else:
            wanted = [rel.name] + ([folder] if folder else [])
        if not set(wanted) <= words:
            missing.append(str(rel))
    assert not missing, f"docs/DESIGN.md's rooms do not name {missing}"
    assert len(words) > 50      # the block was read at all
