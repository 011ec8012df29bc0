"""The import structure of the product packages: imports point down the layers, and never in a circle.

The layers are ARCHITECTURE.md's: kernel → datastore (pki beside it) → ipam → {cni_plugins, bgp} →
felix_agent → {netctl, netlab} → bench. Every import of every product module counts, also one
inside a function or under ``if TYPE_CHECKING``: a lazy import is still a dependency, and a lazy
circle is still a circle that the next refactoring turns into an ImportError. The imports are read
with ``ast``; nothing is imported, so this runs without gRPC, etcd or root.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Floors, bottom first. A package may import any package on a lower floor, and none above.
FLOORS: tuple[frozenset[str], ...] = (
    frozenset({"kernel"}),
    frozenset({"datastore", "pki"}),
    frozenset({"ipam"}),
    frozenset({"cni_plugins", "bgp"}),
    frozenset({"felix_agent"}),
    frozenset({"netctl", "netlab"}),
    frozenset({"bench"}),
)
PACKAGES = frozenset().union(*FLOORS)
FLOOR = {package: level for level, floor in enumerate(FLOORS) for package in floor}

# Imports between packages of one floor that the architecture allows, one way only.
SIDEWAYS: Mapping[tuple[str, str], str] = {
    ("pki", "datastore"): "pki may import nothing above datastore, so datastore itself is allowed",
    ("netctl", "netlab"): "`netctl lab` drives netlab's labs",
}

# Module imports that run against the layers for now, each with the piece of work that removes it.
EXCEPTIONS: Mapping[tuple[str, str], str] = {}


def product_modules() -> dict[str, Path]:
    """Every module of the product packages, by dotted name (a package by its own name)."""
    modules: dict[str, Path] = {}
    for package in sorted(PACKAGES):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_names(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """The absolute names a module imports, with their line: ``a.b`` for ``from a import b`` (b may
    be a submodule or a name in ``a``); relative imports resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                yield f"{source}.{alias.name}", node.lineno


def resolve(target: str, modules: Mapping[str, Path]) -> str | None:
    """The product module an imported name lands in: the longest known module prefix of it."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def module_graph() -> dict[str, dict[str, int]]:
    """module → {imported product module: first line}; a module's import of itself is left out."""
    modules = product_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in imported_names(name, path):
            module = resolve(target, modules)
            if module is not None and module != name:
                edges.setdefault(module, line)
        graph[name] = edges
    return graph


def circles(graph: Mapping[str, Mapping[str, object]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def package_of(module: str) -> str:
    return module.split(".")[0]


def allowed(source: str, target: str) -> bool:
    a, b = package_of(source), package_of(target)
    if a == b or FLOOR[b] < FLOOR[a] or (a, b) in SIDEWAYS:
        return True
    return (source, target) in EXCEPTIONS


GRAPH = module_graph()


def test_every_package_of_the_architecture_is_read() -> None:
    present = {package_of(m) for m in GRAPH}
    assert present >= PACKAGES - {"kernel"}  # kernel/ is the next piece of issue 12
    assert len(GRAPH) > 100


def test_no_import_runs_up_the_layers() -> None:
    upward = sorted(f"{source}:{line} imports {target}"
                    for source, edges in GRAPH.items()
                    for target, line in edges.items()
                    if not allowed(source, target))
    assert upward == []


def test_no_product_module_imports_test_code() -> None:
    found = sorted(f"{name}:{line} imports {target}"
                   for name, path in product_modules().items()
                   for target, line in imported_names(name, path)
                   if target.split(".")[0] == "tests")
    assert found == []


def test_no_circle_between_packages() -> None:
    packages: dict[str, set[str]] = {}
    for source, edges in GRAPH.items():
        packages.setdefault(package_of(source), set()).update(
            package_of(t) for t in edges if package_of(t) != package_of(source) and (source, t) not in EXCEPTIONS)
    assert circles(packages) == []


def test_no_circle_between_modules() -> None:
    assert circles(GRAPH) == []


def test_exceptions_are_still_needed() -> None:
    """An exception nobody needs any more is removed, so it cannot hide a new upward import."""
    stale = [edge for edge in EXCEPTIONS if edge[1] not in GRAPH.get(edge[0], {})]
    assert stale == []


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b": 1}, "b": {"a": 1}}, [["a", "b"]]),
    ({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}, [["a", "b", "c"]]),
    ({"a": {"b": 1}, "b": {}, "c": {"b": 1}}, []),
])
def test_the_circle_finder_finds_circles(graph: dict[str, dict[str, int]], expected: list[list[str]]) -> None:
    assert circles(graph) == expected


def test_lazy_and_relative_imports_are_read(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from . import sibling\n\ndef f():\n    from datastore.keys import x\n    import ipam.block\n")
    names = {n for n, _ in imported_names("cni_plugins.m", module)}
    assert {"cni_plugins.sibling", "datastore.keys.x", "ipam.block"} <= names
