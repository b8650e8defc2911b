"""The layering the code promises: imports flow one way, no cycles (lazy imports included).

Read from the source with ``ast``, so an import inside a function counts as much as one at the
top of a module. An edge is an import that names a bnlab module; the implicit import of a
parent package (``import bnlab.norms.base`` runs ``bnlab/norms/__init__.py`` first) is not
counted, since every submodule of a package would otherwise depend on its ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = Path(__file__).resolve().parent.parent / "bnlab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """bnlab modules that ``path`` imports anywhere in its body."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from bnlab.norms import batchnorm`` names a module; ``import Norm`` a symbol.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in known and n != here)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(path, known) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


# The layers, top to bottom: a module imports only modules of its own package or of a lower
# layer. docs/architecture.md draws the same picture.
LAYERS: list[tuple[str, ...]] = [
    ("bnlab.__main__",),
    ("bnlab.cli",),
    ("bnlab.bench",),
    ("bnlab.batched",),
    ("bnlab.run", "bnlab.report"),
    ("bnlab.probes",),
    ("bnlab.models",),
    ("bnlab.norms", "bnlab.data", "bnlab.rundir"),
    ("bnlab.config",),
    ("bnlab.errors", "bnlab"),
]


def package_of(module: str) -> str:
    """The layer entry a module belongs to: its sub-package, or itself at the top level."""
    for layer in LAYERS:
        for entry in layer:
            if module == entry or module.startswith(entry + "."):
                return entry
    raise AssertionError(f"{module} is in no layer of LAYERS: add it")


def rank(module: str) -> int:
    entry = package_of(module)
    return next(i for i, layer in enumerate(LAYERS) if entry in layer)


def test_the_graph_sees_lazy_imports():
    """The reader finds an import inside a function: cli imports the trainer only inside a command."""
    assert "bnlab.run.trainer" in import_graph()["bnlab.cli"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    assert all(package_of(name) for name in import_graph())


def test_imports_flow_down_the_layers():
    """cli -> bench -> batched -> run | report -> probes -> models -> norms | data | rundir -> config."""
    upward = sorted(f"{name} -> {target}" for name, targets in import_graph().items() for target in targets
                    if package_of(name) != package_of(target) and rank(target) <= rank(name))
    assert upward == []


def test_the_layer_check_catches_an_upward_import():
    assert rank("bnlab.norms.batchnorm") > rank("bnlab.models") > rank("bnlab.run.trainer")
    assert package_of("bnlab.run.trainer") != package_of("bnlab.report.claims")
    assert rank("bnlab.run.trainer") == rank("bnlab.report.claims")  # siblings: neither may import the other


# Torch-free declarations a norm module may use: its options, their bounds, and the error they raise.
NORM_LEAVES = {"bnlab.config.norm_options", "bnlab.config.bounds", "bnlab.errors"}


def test_norms_import_only_norms():
    """bnlab.norms is usable on its own: its modules import torch, each other and the three
    leaves that declare their options; nothing of the trainer, data or probes."""
    graph = import_graph()
    leaves_stay_leaves = {leaf: sorted(graph[leaf] - NORM_LEAVES) for leaf in NORM_LEAVES}
    assert leaves_stay_leaves == {leaf: [] for leaf in NORM_LEAVES}
    outside = {name: sorted(t for t in targets
                            if not t.startswith("bnlab.norms") and t not in NORM_LEAVES)
               for name, targets in graph.items() if name.startswith("bnlab.norms")}
    assert {name: t for name, t in outside.items() if t} == {}


def test_report_side_never_imports_the_trainer():
    """cli -> report -> rundir: reading runs back needs neither the trainer nor torch's modules."""
    graph = import_graph()
    reachable, todo = set(), [m for m in graph if m.startswith("bnlab.report")]
    while todo:
        for target in graph[todo.pop()]:
            if target not in reachable:
                reachable.add(target)
                todo.append(target)
    forbidden = ("bnlab.run.", "bnlab.models", "bnlab.probes.", "bnlab.data", "bnlab.norms")
    assert sorted(m for m in reachable if m.startswith(forbidden)) == []


def test_the_norm_modules_import_the_registry_not_the_package():
    """No import cycle: ``bnlab.norms`` imports its modules, they import ``registry``/``base``."""
    for path in (REPO / "bnlab" / "norms").glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "bnlab.norms", path.name
            if isinstance(node, ast.Import):
                assert all(a.name != "bnlab.norms" for a in node.names), path.name
