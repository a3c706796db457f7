"""The import graph of `broker/` and `protocol/`: no cycles, and layers import downward only.

The graph is read from the source (ast), not from `sys.modules`, so an
import placed inside a function to dodge a cycle counts like one at the top
of the module: a cycle papered over that way is still a cycle. An import
`from a.b import c` is an edge to `a.b.c` when that is a module of ours,
otherwise to `a.b`; a package's `__init__` is not counted as imported by
its submodules (Python runs it first, but that is not a dependency the
submodule chose).

The layers (DESIGN.md, "Shape"): `protocol` (wire types, no I/O) imports
nothing of `broker`; `broker.engine` imports nothing of the gateway, the
HTTP layer or the daemon.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("broker", "protocol")

# What broker.engine must never import (the layers above it).
ENGINE_FORBIDDEN = (
    "broker.gateway", "broker.http", "broker.server", "broker.cli",
    # The daemon: its entry points, its settings, systemd, the sweeps it runs.
    "broker.__main__", "broker.config", "broker.systemd", "broker.sweeps", "broker.gc_tuning",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imported(module: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported module of ours, line) for every import statement, at any depth of the file."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                # `import a.b.c` binds `a` but runs `a.b.c`: the deepest of ours counts.
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name:
                    yield name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    yield f"{source}.{alias.name}", node.lineno
                elif source in known:
                    yield source, node.lineno


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line that imports it}, our modules only."""
    known = _modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in known.items():
        edges: dict[str, int] = {}
        for target, line in _imported(module, path, known):
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    """The component's edges that stay inside it, one per line, with the importing line."""
    members = set(component)
    return "\n".join(
        f"  {source}:{line} -> {target}"
        for source in component
        for target, line in sorted(graph[source].items())
        if target in members
    )


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_imports_walk_finds_every_kind_of_import() -> None:
    """The walker sees imports inside functions and relative ones, so a dodge cannot hide."""
    graph = _graph()
    assert "broker.engine.writer" in graph
    assert "protocol.codec" in graph
    # Every module of ours imports something of ours or is a leaf; at least
    # some edges exist, or the walker read nothing.
    assert sum(len(edges) for edges in graph.values()) > 100


def test_imports_have_no_cycle() -> None:
    """No import cycle in broker/ or protocol/, counting imports inside functions too."""
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        _describe(component, graph) for component in cycles
    )


def test_imports_protocol_never_imports_broker() -> None:
    """protocol/ is wire types and validation, below the broker: it imports nothing of it."""
    graph = _graph()
    wrong = [
        f"{source} -> {target}"
        for source, edges in sorted(graph.items()) if _within(source, "protocol")
        for target in sorted(edges) if _within(target, "broker")
    ]
    assert not wrong, "protocol imports broker:\n" + "\n".join(wrong)


def test_imports_engine_never_imports_the_layers_above() -> None:
    """broker.engine imports nothing of the gateway, the HTTP layer or the daemon."""
    graph = _graph()
    wrong = [
        f"{source} -> {target}"
        for source, edges in sorted(graph.items()) if _within(source, "broker.engine")
        for target in sorted(edges)
        if any(_within(target, layer) for layer in ENGINE_FORBIDDEN)
    ]
    assert not wrong, "broker.engine imports a layer above it:\n" + "\n".join(wrong)
