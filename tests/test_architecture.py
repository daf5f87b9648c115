"""The direction of npdraw's imports: every module has a layer, imports point down (or
sideways within a layer), and the graph of npdraw-internal imports has no cycle.

Every import counts, also one inside a function: an import hidden in a function to dodge
a cycle is still a cycle. Imports of other packages (numpy, h5py, and the optional cupy,
mpi4py, matplotlib, tensorboardX, tqdm, imported lazily where they are used) are not
npdraw's and are left out of the graph.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "npdraw"

# Bottom to top. A module may import modules of its own layer or of a lower one. An entry
# names a module (npdraw/<name>.py) or a subpackage (npdraw/<name>/, all its modules).
# Names that do not exist (yet) are allowed; a module that exists but is missing fails.
LAYERS = [
    # no npdraw imports: thread counts, the array module, configuration, run guards,
    # the progress bar
    ["threads", "backend", "config", "guards", "progress"],
    ["layers"],                       # the paired forward/backward ops
    ["reference"],                    # the plain models, to be read first
    ["engine_numba", "engine_layers", "engine_attention", "engine"],   # the fast paths
    ["model", "classifier"],          # the models' public functions
    ["data", "optim", "checkpoint", "launcher", "distributed"],   # what training is made of
    ["images", "evaluate", "frames", "pictures", "monitor"],   # what a run writes or measures
    ["runs"],
    ["train"],
    # the command lines: npdraw's, and `python -m npdraw.reference` (the plain model
    # trained on real data with the plain Adam, so it stands above both)
    ["helpsections", "cli_options", "cli", "__main__", "reference.__main__"],
]

# Imports known to close a cycle (and to point up a layer), each (importer, imported), to be
# deleted once the cycle is gone. The test fails when one of them no longer exists, so this
# set cannot outlive its reason.
KNOWN_CYCLE_EDGES: set = set()

# Modules that import the package npdraw itself (its __init__, the public face) rather than
# one of its submodules, each with its reason. The test fails when one of them no longer
# does, so an entry cannot outlive its reason.
KNOWN_ROOT_IMPORTS = {
    "npdraw.cli",   # `--version`: the version lives in npdraw/__init__.py, where pyproject reads it
}


def _module_files() -> dict:
    """Module name (npdraw.x, npdraw.x.y; npdraw for the package) -> its file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _module_files()


def _imports(name: str, path: Path) -> set:
    """The npdraw modules that module ``name`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = base + "." + node.module if node.module else base
            else:
                base = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name`, pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "npdraw" or t.startswith("npdraw."))
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer_of(module: str):
    """(index, entry) of a module's layer, from its own entry or its subpackage's."""
    parts = module.split(".")[1:]
    for depth in range(len(parts), 0, -1):
        entry = ".".join(parts[:depth])
        for index, layer in enumerate(LAYERS):
            if entry in layer:
                return index, entry
    return None


def _find_cycle(graph: dict):
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state = {}   # module -> 1 while on the path, 2 when done

    def visit(node, path):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def _without_known(graph: dict) -> dict:
    return {a: {b for b in targets if (a, b) not in KNOWN_CYCLE_EDGES}
            for a, targets in graph.items()}


def test_the_graph_is_read_from_every_kind_of_import():
    """The parser sees imports at the top, inside functions, relative and absolute."""
    assert "npdraw.data.sources" in GRAPH["npdraw.data.synthetic"]
    assert "npdraw.data" in GRAPH["npdraw.runs"]             # `from . import data` in a function
    assert "npdraw.data.synthetic" in GRAPH["npdraw.train"]  # `from .data import synthetic`
    assert "npdraw.config" in GRAPH["npdraw.cli"]            # `from npdraw.config import ...`
    assert "npdraw.backend" in GRAPH["npdraw.reference.draw"]   # `from ..backend import ...`


def test_there_is_no_import_cycle():
    cycle = _find_cycle(_without_known(GRAPH))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_known_cycle_edges_still_exist():
    gone = sorted(edge for edge in KNOWN_CYCLE_EDGES if edge[1] not in GRAPH.get(edge[0], ()))
    assert not gone, (f"{gone} no longer imported: delete them from KNOWN_CYCLE_EDGES")
    # each known edge does close a cycle (else it needs no excuse)
    for a, b in KNOWN_CYCLE_EDGES:
        graph = _without_known(GRAPH)
        graph[a] = graph[a] | {b}
        assert _find_cycle(graph), f"{a} -> {b} closes no cycle: delete it from KNOWN_CYCLE_EDGES"


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if m != "npdraw" and _layer_of(m) is None)
    assert not missing, f"modules missing from LAYERS in tests/test_architecture.py: {missing}"


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in sorted(GRAPH.items()):
        if module == "npdraw" or _layer_of(module) is None:
            continue   # the public face may import from any layer; missing: the test above
        own, own_entry = _layer_of(module)
        for target in sorted(targets):
            if target == "npdraw" or (module, target) in KNOWN_CYCLE_EDGES:
                continue
            layer = _layer_of(target)
            if layer is not None and layer[0] > own:
                wrong.append(f"{module} (layer {own}: {own_entry}) imports {target} "
                             f"(layer {layer[0]}: {layer[1]})")
    assert not wrong, "imports of a higher layer:\n" + "\n".join(wrong)


def test_nothing_imports_the_package_itself():
    importers = {m for m, targets in GRAPH.items() if "npdraw" in targets}
    assert importers <= KNOWN_ROOT_IMPORTS, (
        f"{sorted(importers - KNOWN_ROOT_IMPORTS)} import npdraw itself (its __init__); "
        "import the submodule that holds the name instead")
    stale = sorted(KNOWN_ROOT_IMPORTS - importers)
    assert not stale, f"{stale} no longer import npdraw itself: delete them from KNOWN_ROOT_IMPORTS"


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_a_cycle_is_found_and_named(graph, cycle):
    assert _find_cycle(graph) == cycle
