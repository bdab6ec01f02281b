"""The package's layers: no import cycle, no upward import, no private name across modules, no
module over 600 lines, and kernels/ importing nothing from lora_fused (docs/design.md, "Layout").

Every module under lora_fused/ and kernels/ (installed as ``lora_fused.kernels``) is parsed with
``ast``, imports inside functions included (lazy imports run too, and a lazy cycle or upward
import is the same knot), and ``importlib.import_module("...")`` with a constant name. Nothing is
imported. The checker is tested on small synthetic packages first (``tmp_path``), so a pass on
the real tree means each rule was looked for.

FLOORS, lowest first: a module may import modules of its own floor or below. serving/ is one
floor here; docs/design.md puts its model level (adapter_batch, inject_multi_lora) above
modules/: give that module its own entry when it exists.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "lora_fused"
KERNELS = "lora_fused.kernels"

#: Floor of each top-level module or subpackage of lora_fused (its modules inherit it).
FLOORS = {
    KERNELS: -1,
    "lora_fused.validation": 0, "lora_fused.reference": 0, "lora_fused.value_cache": 0, "lora_fused._compat": 0,
    "lora_fused.dispatch": 1,
    "lora_fused.backends": 2,
    "lora_fused.ops": 3,
    "lora_fused.serving": 4,
    "lora_fused.modules": 5,
    "lora_fused.adapters": 6,
    "lora_fused.integrations": 7,
    "lora_fused": 8, "lora_fused.demo": 8,
}
#: The one lora_fused module that imports kernel modules (docs/design.md, "How a call flows").
KERNEL_IMPORTER = "lora_fused.dispatch.backend"
MAX_LINES = 600


# ----------------------------------------------------------------- the checker
@dataclass(frozen=True)
class Import:
    importer: str
    target: str           # a module of the tree
    line: int
    name: Optional[str] = None   # a non-module name taken from ``target`` (``from target import name``)
    relative: bool = False


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    lines: int
    imports: list[Import] = field(default_factory=list)
    private_uses: list[tuple[str, str, int]] = field(default_factory=list)  # (module, attribute, line)


def module_names(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """{dotted name: (path, is a package's __init__)} of every .py file under ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        names[".".join([package, *parts])] = (path, is_package)
    return names


class _ImportVisitor(ast.NodeVisitor):
    """The imports of one module (at any depth) and its ``module._private`` attribute uses."""

    def __init__(self, module: Module, known: set[str]):
        self.module, self.known = module, known
        self.aliases: dict[str, str] = {}  # local name -> module of the tree it is bound to
        self.package = module.name if module.is_package else module.name.rpartition(".")[0]

    def _add(self, target: str, line: int, name: Optional[str] = None, relative: bool = False) -> None:
        if target in self.known:
            self.module.imports.append(Import(self.module.name, target, line, name, relative))

    def _bind(self, local: str, module: str) -> None:
        if module in self.known:
            self.aliases[local] = module

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)
            top = alias.name.split(".")[0]
            self._bind(alias.asname or top, alias.name if alias.asname else top)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".")
            base_parts = base_parts[:len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in self.known:  # a module: the import names no attribute of ``base``
                self._add(submodule, node.lineno, relative=bool(node.level))
                self._bind(alias.asname or alias.name, submodule)
            else:
                self._add(base, node.lineno, alias.name, relative=bool(node.level))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            self._add(node.args[0].value, node.lineno)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain, inner = [], node
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name) and inner.id in self.aliases:  # a module of the tree
            target = self.aliases[inner.id]
            for attr in reversed(chain):  # walk down submodules; the first other attribute is a name
                if f"{target}.{attr}" in self.known:
                    target = f"{target}.{attr}"
                    continue
                if _private(attr) and target != self.module.name:
                    self.module.private_uses.append((target, attr, node.lineno))
                break
            return  # the inner attributes of this chain are its prefixes: seen
        self.generic_visit(node)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def scan(roots: dict[str, Path]) -> dict[str, Module]:
    """Every module under each root (``{package name: folder}``), with its imports of the others."""
    files = {}
    for package, root in roots.items():
        files.update(module_names(root, package))
    known = set(files)
    modules = {}
    for name, (path, is_package) in files.items():
        text = path.read_text(encoding="utf-8")
        module = Module(name, path, is_package, len(text.splitlines()))
        _ImportVisitor(module, known).visit(ast.parse(text, filename=str(path)))
        modules[name] = module
    return modules


def import_cycles(modules: dict[str, Module]) -> list[str]:
    """One line per cycle (strongly connected set of modules): its modules and the imports that join them."""
    graph = {name: sorted({i.target for i in m.imports if i.target != name}) for name, m in modules.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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

    for v in sorted(graph):
        if v not in index:
            connect(v)
    lines = []
    for component in sorted(found):
        joins = sorted(f"{i.importer}:{i.line} -> {i.target}" for name in component
                       for i in modules[name].imports if i.target in component and i.target != name)
        lines.append(f"cycle among {', '.join(component)}: " + "; ".join(joins))
    return lines


def floor_of(name: str, floors: dict[str, int]) -> Optional[int]:
    """The floor of the longest key of ``floors`` that is ``name`` or a package above it; the top
    package's key is its __init__'s alone (a module with no key of its own has no floor)."""
    parts = name.split(".")
    for n in range(len(parts), 1, -1):
        key = ".".join(parts[:n])
        if key in floors:
            return floors[key]
    return floors.get(name) if len(parts) == 1 else None


def upward_imports(modules: dict[str, Module], floors: dict[str, int]) -> list[str]:
    out = {}  # one line per import statement and target
    for name, module in sorted(modules.items()):
        mine = floor_of(name, floors)
        if mine is None:
            out[f"{name} has no floor: add it (or its subpackage) to FLOORS"] = None
            continue
        for i in module.imports:
            theirs = floor_of(i.target, floors)
            if theirs is not None and theirs > mine:
                out[f"{name}:{i.line} (floor {mine}) imports {i.target} (floor {theirs})"] = None
    return list(out)


def private_imports(modules: dict[str, Module]) -> list[str]:
    out = []
    for name, module in sorted(modules.items()):
        for i in module.imports:
            if i.name is not None and _private(i.name) and i.target != name:
                out.append(f"{name}:{i.line} imports {i.target}.{i.name}")
        for target, attr, line in module.private_uses:
            out.append(f"{name}:{line} uses {target}.{attr}")
    return out


def long_modules(modules: dict[str, Module], package: str, limit: int, exclude: tuple[str, ...] = ()) -> list[str]:
    """Modules of ``package`` over ``limit`` lines, but those of the packages in ``exclude``."""
    return [f"{name}: {m.lines} lines (at most {limit})" for name, m in sorted(modules.items())
            if _inside(name, package) and not any(_inside(name, e) for e in exclude) and m.lines > limit]


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def kernels_importing_package(modules: dict[str, Module], kernels: str, package: str) -> list[str]:
    """Imports by the kernels (package ``kernels``, inside ``package`` once installed) of the
    package's other modules, and absolute imports among the kernels (they would run the
    package's __init__ first)."""
    out = []
    for name, m in sorted(modules.items()):
        if not _inside(name, kernels):
            continue
        for i in m.imports:
            if not _inside(i.target, kernels):
                out.append(f"{name}:{i.line} imports {i.target}")
            elif not i.relative:
                out.append(f"{name}:{i.line} imports {i.target} by its absolute name (runs {package}/__init__.py)")
    return out


def kernel_importers(modules: dict[str, Module], kernels: str, package: str, allowed: str) -> list[str]:
    """Imports of kernel modules by the package's modules other than ``allowed``."""
    return [f"{name}:{i.line} imports {i.target}" for name, m in sorted(modules.items())
            if _inside(name, package) and not _inside(name, kernels) and name != allowed
            for i in m.imports if _inside(i.target, kernels)]


# ----------------------------------------------------------------- the real tree
@pytest.fixture(scope="module")
def tree() -> dict[str, Module]:
    return scan({PACKAGE: REPO / "lora_fused", KERNELS: REPO / "kernels"})


def _report(problems: list[str]) -> str:
    return f"{len(problems)} found:\n" + "\n".join(problems)


def test_no_import_cycle(tree):
    problems = import_cycles(tree)
    assert not problems, _report(problems)


def test_no_upward_import(tree):
    problems = upward_imports(tree, FLOORS)
    assert not problems, _report(problems)


def test_no_private_name_across_modules(tree):
    problems = private_imports(tree)
    assert not problems, _report(problems)


def test_no_module_over_600_lines(tree):
    """In lora_fused/ (kernels/, a kernel family per file, is not held to it)."""
    problems = long_modules(tree, PACKAGE, MAX_LINES, exclude=(KERNELS,))
    assert not problems, _report(problems)


def test_kernels_import_nothing_from_lora_fused(tree):
    problems = kernels_importing_package(tree, KERNELS, PACKAGE)
    assert not problems, _report(problems)


def test_only_the_backend_imports_kernel_modules(tree):
    """The kernel families import triton: lora_fused reaches them through dispatch/backend.py's
    accessors (``lora_kernels()``, ``multi_kernels()``, ``delta_kernels()``, ...)."""
    problems = kernel_importers(tree, KERNELS, PACKAGE, KERNEL_IMPORTER)
    assert not problems, _report(problems)


def test_the_scan_sees_the_package():
    modules = scan({PACKAGE: REPO / "lora_fused", KERNELS: REPO / "kernels"})
    assert {"lora_fused", "lora_fused.dispatch.backend", "lora_fused.kernels.common"} <= set(modules)
    backend = modules["lora_fused.dispatch.backend"]
    assert any(i.target.startswith(KERNELS) for i in backend.imports)  # lazy ones included


# ----------------------------------------------------------------- the checker, on synthetic trees
def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


SYNTHETIC_FLOORS = {"pkg.kernels": -1, "pkg.low": 0, "pkg.mid": 1, "pkg.high": 2, "pkg.loop_a": 1, "pkg.loop_b": 1,
                    "pkg.long": 0, "pkg": 3}


@pytest.fixture
def synthetic(tmp_path):
    """A package with one of each fault, and a kernels folder that imports the package."""
    write_package(tmp_path / "pkg", {
        "__init__.py": "from .high import api\n",
        "low.py": """
            VALUE = 1
            _hidden = 2

            def lazy():
                from .high import api  # upward, inside a function
                return api
            """,
        "mid.py": """
            from . import low
            from .low import _hidden  # private across modules
            from .kernels import common

            def read():
                return low._hidden + low.VALUE  # private attribute across modules
            """,
        "high.py": """
            from .mid import read

            def api():
                return read()
            """,
        "loop_a.py": "from . import loop_b\n",
        "loop_b.py": """
            def f():
                import pkg.loop_a  # lazy, closes the cycle
            """,
        "long.py": "x = 1\n" * (MAX_LINES + 1),
    })
    write_package(tmp_path / "kern", {
        "__init__.py": "",
        "common.py": "from .. import low\nimport pkg.kernels.other\n",
        "other.py": "from .common import *\n",
    })
    return scan({"pkg": tmp_path / "pkg", "pkg.kernels": tmp_path / "kern"})


def test_checker_finds_a_cycle(synthetic):
    cycles = import_cycles(synthetic)
    assert any("pkg.loop_a, pkg.loop_b" in c and "pkg.loop_b:3 -> pkg.loop_a" in c for c in cycles), cycles
    assert any("pkg.high" in c and "pkg.low" in c for c in cycles), cycles  # low -> high -> mid -> low


def test_checker_finds_an_upward_import(synthetic):
    problems = upward_imports(synthetic, SYNTHETIC_FLOORS)
    assert "pkg.low:6 (floor 0) imports pkg.high (floor 2)" in problems, problems
    assert not any(p.startswith(("pkg.high", "pkg.mid:")) for p in problems), problems


def test_checker_asks_for_a_floor(synthetic):
    floors = {k: v for k, v in SYNTHETIC_FLOORS.items() if k != "pkg.long"}
    assert "pkg.long has no floor: add it (or its subpackage) to FLOORS" in upward_imports(synthetic, floors)


def test_checker_finds_private_names(synthetic):
    problems = private_imports(synthetic)
    assert "pkg.mid:3 imports pkg.low._hidden" in problems, problems
    assert "pkg.mid:7 uses pkg.low._hidden" in problems, problems
    assert len(problems) == 2, problems  # low's own _hidden is its own


def test_checker_finds_long_modules(synthetic):
    assert long_modules(synthetic, "pkg", MAX_LINES) == [f"pkg.long: {MAX_LINES + 1} lines (at most {MAX_LINES})"]
    assert long_modules(synthetic, "pkg", MAX_LINES, exclude=("pkg.long",)) == []


def test_checker_finds_kernels_importing_the_package(synthetic):
    assert kernels_importing_package(synthetic, "pkg.kernels", "pkg") == [
        "pkg.kernels.common:1 imports pkg.low",
        "pkg.kernels.common:2 imports pkg.kernels.other by its absolute name (runs pkg/__init__.py)"]


def test_checker_finds_kernel_importers_besides_the_allowed_one(synthetic):
    assert kernel_importers(synthetic, "pkg.kernels", "pkg", allowed="pkg.mid") == []
    assert kernel_importers(synthetic, "pkg.kernels", "pkg", allowed="pkg.high") == [
        "pkg.mid:4 imports pkg.kernels.common"]


def test_checker_passes_a_clean_tree(tmp_path):
    write_package(tmp_path / "pkg", {
        "__init__.py": "from .high import api\n__all__ = ['api']\n",
        "low.py": "VALUE = 1\n_own = 2\n\ndef f():\n    return _own\n",
        "mid.py": "from . import low\n\ndef read():\n    return low.VALUE + low.__name__.count('.')\n",
        "high.py": "from .mid import read\n\ndef api():\n    import pkg.low\n    return read() + pkg.low.VALUE\n",
    })
    modules = scan({"pkg": tmp_path / "pkg"})
    floors = {"pkg.low": 0, "pkg.mid": 1, "pkg.high": 2, "pkg": 3}
    assert import_cycles(modules) == []
    assert upward_imports(modules, floors) == []
    assert private_imports(modules) == []
    assert long_modules(modules, "pkg", MAX_LINES) == []
