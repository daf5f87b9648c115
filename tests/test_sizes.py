"""The size of npdraw's rooms (issue 22): no function over 100 lines, no module over 700,
the CLI module (npdraw/cli.py) under 600. Lengths are read with ast: a function's from
its ``def`` line to its last line, a module's from its first line to its last statement.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "npdraw"
MAX_FUNCTION = 100
MAX_MODULE = 700
CLI_BELOW = 600

# The only functions allowed over MAX_FUNCTION lines, each with its reason. The test below
# fails when one of them is no longer that long, so an entry cannot outlive its reason.
LONG_FUNCTIONS = {
    "engine.py: forward": "the T glimpses unrolled into one pass over the stacked, "
                          "preallocated buffers; each line is a step of eq 3-12 in order, "
                          "and the buffers' layout would have to be passed to every piece",
    "engine.py: backward": "BPTT through the same buffers in reverse order, the mirror of "
                           "forward line for line, which is how it is checked against it",
}


def function_lengths(source: str) -> dict:
    """{name: lines} of every function in ``source``, methods and nested functions named
    by their path (Class.method, outer.inner)."""
    out = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    out[name] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def module_length(source: str) -> int:
    """Lines from the top of the module to the end of its last statement."""
    body = ast.parse(source).body
    return body[-1].end_lineno if body else 0


MODULES = sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def test_no_function_is_over_100_lines():
    long = {f"{_name(p)}: {f}": n for p in MODULES
            for f, n in function_lengths(p.read_text(encoding="utf-8")).items()
            if n > MAX_FUNCTION}
    unexcused = {k: n for k, n in long.items() if k not in LONG_FUNCTIONS}
    assert not unexcused, f"functions over {MAX_FUNCTION} lines: {unexcused}"
    stale = sorted(set(LONG_FUNCTIONS) - set(long))
    assert not stale, f"{stale} are {MAX_FUNCTION} lines or less: delete them from LONG_FUNCTIONS"


def test_no_module_is_over_700_lines_and_the_cli_is_under_600():
    lengths = {_name(p): module_length(p.read_text(encoding="utf-8")) for p in MODULES}
    long = {k: n for k, n in lengths.items() if n > MAX_MODULE}
    assert not long, f"modules over {MAX_MODULE} lines: {long}"
    assert lengths["cli.py"] < CLI_BELOW, f"npdraw/cli.py has {lengths['cli.py']} lines"


def test_the_measures_count_what_they_should():
    inner = "\n".join(f"        x{i} = {i}" for i in range(99))
    source = ("import os\n\n\nclass A:\n    def f(self):\n" + inner + "\n\n\n"
              "def g():\n    def h():\n        return 1\n    return h\n")
    assert function_lengths(source) == {"A.f": 100, "g": 4, "g.h": 2}
    assert module_length(source) == 110
    assert module_length('"""Only a docstring,\non two lines."""\n\n\n') == 2
