"""The package's modules import each other without cycles, function-local imports included.

A cycle hidden behind an import inside a function still couples the two modules both ways
and breaks as soon as someone moves the import to the top; so the graph here is built from
every import statement in the source (the AST), wherever it stands. Only imports under
``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The core package and each engine plugin's package, with the folder that holds it.
PACKAGES = {
    "dynamo_run": REPO,
    **{
        f"dynamo_run_{p.name}": p
        for p in sorted((REPO / "engines").iterdir())
        if (p / f"dynamo_run_{p.name}" / "__init__.py").exists()
    },
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> its file, for every module of every package."""
    found: dict[str, Path] = {}
    for package, root in PACKAGES.items():
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(
    module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]
) -> set[str]:
    """The package modules an import statement loads: for ``from X import Y`` the submodule
    X.Y where Y is one, else X."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        parts = module.split(".")
        if not is_package:
            parts.pop()
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    found = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in modules:
            found.add(sub)
        elif base in modules:
            found.add(base)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the packages it imports (directly, anywhere in it)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: set[str] = set()
        for node in _imports(tree):
            edges |= _targets(name, path.name == "__init__.py", node, set(modules))
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
    return sorted(found)


def _path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One cycle through the component's first module, as ``a -> b -> a``."""
    members = set(component)
    start = component[0]
    queue = [[start]]
    seen = {start}
    while queue:
        path = queue.pop(0)
        for nxt in sorted(graph[path[-1]] & members):
            if nxt == start:
                return " -> ".join([*path, start])
            if nxt not in seen:
                seen.add(nxt)
                queue.append([*path, nxt])
    return ", ".join(component)


def test_the_graph_sees_function_local_and_relative_imports() -> None:
    """The graph builder itself: a function-local import is an edge, a relative one is
    resolved, and TYPE_CHECKING imports are not."""
    graph = import_graph()
    # runner imports its inputs by name at run time, but the engine registry at the top
    assert "dynamo_run.engine" in graph["dynamo_run.runner"]
    # parsers/__init__ uses `from .reasoning import ...`
    assert "dynamo_run.parsers.reasoning" in graph["dynamo_run.parsers"]
    # mocker/__init__ imports its engine inside create_engine only
    assert "dynamo_run.mocker.engine" in graph["dynamo_run.mocker"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(package: str) -> None:
    graph = import_graph()
    found = [c for c in cycles(graph) if c[0].split(".")[0] == package]
    assert not found, "import cycles:\n" + "\n".join(_path(graph, c) for c in found)
