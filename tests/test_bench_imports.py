"""bench/ imports in one direction: no module of the bench reaches itself again through its imports.

Every import counts, also one inside a function (a lazy import hides a cycle from Python, not
from a reader): the graph is read from the source with ``ast``, nothing is imported.
An import of a package counts as an import of its ``__init__.py``; importing a submodule does
not count as importing its package (Python runs the package first, but only a package that
imports its own submodules back would close a loop, and that is an edge this graph holds).
"""
from __future__ import annotations

import ast
import pathlib

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


def module_name(path: pathlib.Path) -> str:
    """``bench/providers/base.py`` -> ``bench.providers.base``; a package is its ``__init__``."""
    parts = path.relative_to(BENCH.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def bench_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(BENCH.rglob("*.py"))}


def imported_modules(path: pathlib.Path, modules: dict) -> set[str]:
    """The bench modules ``path`` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # "from . import goals" imports a module; "from .cases import Case" a name of one
            targets = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "bench.cases.Case" -> "bench.cases"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = bench_modules()
    return {name: imported_modules(path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state: dict[str, str] = {}   # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_sees_a_cycle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # bench/__main__.py imports bench.runner only inside main(), as "from .runner import ...".
    assert "bench.runner" in graph["bench.__main__"]
    assert "bench.cases" in graph["bench.__main__"]


def test_bench_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle in bench/: " + " -> ".join(cycle)
