"""The package's import rules, read from the source with `ast` (nothing is imported):

- imports point downward only, in the order `cli` > `server` > `stack` > `runtime` > `control`
  > `executor` > `model` > `kernels` (docs/layers.md); `client` imports only `protocol`,
  `config` and itself, and only `cli` imports it; `protocol` and `config` are neutral modules
  for `cli`, `server` and `client`, and import no layer; `__main__` imports only `cli`;
- no two modules of `pie_trio` import each other, directly or through others (a cycle).

Every import counts: at module level, inside functions and under `if TYPE_CHECKING:`, with
relative imports resolved. `from package import name` counts as an import of the submodule
`package.name` when there is one, else of the package itself; an import of `a.b.c` is an edge to
`a.b.c` only (not to the packages `a` and `a.b` Python also initialises on the way).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "pie_trio"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

ORDER = ("cli", "server", "stack", "runtime", "control", "executor", "model", "kernels")
NEUTRAL = frozenset({"protocol", "config"})
ROOT = ""  # the package's own __init__ (its version): anything may import it


def _allowed_targets() -> dict[str, frozenset[str]]:
    """layer -> the layers its modules may import (the root package always allowed)."""
    allowed = {layer: frozenset(ORDER[rank:]) for rank, layer in enumerate(ORDER)}
    allowed["cli"] |= NEUTRAL | {"client"}
    allowed["server"] |= NEUTRAL
    allowed["client"] = NEUTRAL | {"client"}
    allowed["protocol"] = NEUTRAL
    allowed["config"] = NEUTRAL
    allowed["__main__"] = frozenset({"cli"})
    allowed[ROOT] = frozenset()
    return {layer: targets | {ROOT} for layer, targets in allowed.items()}


ALLOWED = _allowed_targets()


@dataclass(frozen=True)
class Source:
    """One module's text, and whether it is a package's `__init__`."""

    text: str
    is_package: bool = False


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} imports {self.target} (line {self.line})"


# -- reading the package ------------------------------------------------------------------

def package_sources(directory: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, Source]:
    """Every module under `directory`, by dotted name."""
    sources = {}
    for path in sorted(directory.rglob("*.py")):
        parts = list(path.relative_to(directory).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        sources[".".join([package, *parts])] = Source(path.read_text(), is_package)
    return sources


def imports_of(name: str, source: Source, known: Mapping[str, Source]) -> Iterator[Import]:
    """Every import of a module of the package in `source`, wherever it stands."""
    for node in ast.walk(ast.parse(source.text, filename=name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, _nearest_module(alias.name, known), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(name, source.is_package, node.module, node.level)
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                target = submodule if submodule in known else module
                yield Import(name, _nearest_module(target, known), node.lineno)


def _absolute(importer: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base.pop()  # a module's relative imports start from its package
    base = base[:len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _nearest_module(name: str, known: Mapping[str, Source]) -> str:
    """`name`, or its longest prefix that is a module (an attribute imported as a name)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) if parts else name


def import_graph(sources: Mapping[str, Source]) -> dict[str, list[Import]]:
    """module -> its imports of other modules of the package, in source order (one per module
    and line: `from m import a, b` is one import of `m`)."""
    return {name: list(dict.fromkeys(i for i in imports_of(name, source, sources)
                                     if i.target in sources and i.target != name))
            for name, source in sources.items()}


# -- the two checks -----------------------------------------------------------------------

def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def upward_imports(graph: Mapping[str, list[Import]]) -> list[str]:
    """Each import that breaks the layer order, and each module in no known layer."""
    problems = []
    for module, imports in graph.items():
        layer = layer_of(module)
        if layer not in ALLOWED:
            problems.append(f"{module} is in no layer of the map in tests/test_layers.py")
            continue
        for found in imports:
            if layer_of(found.target) not in ALLOWED[layer]:
                problems.append(f"{found}: {layer or PACKAGE} may not import "
                                f"{layer_of(found.target) or PACKAGE}")
    return problems


def import_cycles(graph: Mapping[str, list[Import]]) -> list[str]:
    """One cycle through each group of modules that import each other (strongly connected
    components of more than one module), as `a (line n) -> b (line m) -> ... -> a`, each
    line that of the import in the module before it."""
    return [_describe_cycle(graph, component) for component in _components(graph)
            if len(component) > 1]


def _components(graph: Mapping[str, list[Import]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            child = next((e.target for e in edges), None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    components.append(_pop_component(stack, on_stack, node))
            elif child not in index:
                index[child] = lowlink[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph[child])))
            elif child in on_stack:
                lowlink[node] = min(lowlink[node], index[child])
    return components


def _pop_component(stack: list[str], on_stack: set[str], node: str) -> list[str]:
    component = []
    while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
            return sorted(component)


def _describe_cycle(graph: Mapping[str, list[Import]], component: list[str]) -> str:
    """The shortest cycle through the component's first module (breadth-first)."""
    members, start = set(component), component[0]
    came_by: dict[str, Import] = {}
    frontier = [start]
    while frontier and start not in came_by:
        following = []
        for node in frontier:
            for found in graph[node]:
                if found.target in members and found.target not in came_by:
                    came_by[found.target] = found
                    following.append(found.target)
        frontier = following
    path, node = [], start
    while True:  # walk back from `start` to itself
        found = came_by[node]
        path.append(found)
        node = found.importer
        if node == start:
            break
    steps = "".join(f"{i.importer} (line {i.line}) -> " for i in reversed(path))
    return f"{steps}{start}   [modules involved: {', '.join(component)}]"


# -- the tests ----------------------------------------------------------------------------

def test_imports_point_downward() -> None:
    problems = upward_imports(import_graph(package_sources()))
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_no_import_cycles() -> None:
    cycles = import_cycles(import_graph(package_sources()))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_layer_is_in_the_map() -> None:
    """A new top-level module or package must be placed in the order before it is checked."""
    layers = {layer_of(module) for module in package_sources()}
    assert layers <= set(ALLOWED), layers - set(ALLOWED)


def test_the_checks_find_an_upward_import_and_a_cycle() -> None:
    sources = {
        "pie_trio": Source("", is_package=True),
        "pie_trio.model": Source("", is_package=True),
        "pie_trio.model.runner": Source(
            "def load():\n"
            "    from pie_trio.executor import executor\n"),  # upward, inside a function
        "pie_trio.executor": Source("", is_package=True),
        "pie_trio.executor.executor": Source("from ..model.runner import load\n"),
        "pie_trio.runtime": Source("", is_package=True),
        "pie_trio.runtime.a": Source(
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from pie_trio.runtime.b import B\n"),
        "pie_trio.runtime.b": Source("from . import c\n"),
        "pie_trio.runtime.c": Source("import pie_trio.runtime.a\nimport trio\n"),
        "pie_trio.client": Source("from pie_trio.server import app\n", is_package=True),
        "pie_trio.server": Source("", is_package=True),
        "pie_trio.server.app": Source("from pie_trio import protocol, stack\n"),
        "pie_trio.stack": Source(""),
        "pie_trio.protocol": Source(""),
    }
    graph = import_graph(sources)
    assert upward_imports(graph) == [
        "pie_trio.model.runner imports pie_trio.executor.executor (line 2): "
        "model may not import executor",
        "pie_trio.client imports pie_trio.server.app (line 1): client may not import server",
    ]
    assert import_cycles(graph) == [
        "pie_trio.executor.executor (line 1) -> pie_trio.model.runner (line 2) -> "
        "pie_trio.executor.executor   "
        "[modules involved: pie_trio.executor.executor, pie_trio.model.runner]",
        "pie_trio.runtime.a (line 3) -> pie_trio.runtime.b (line 1) -> pie_trio.runtime.c "
        "(line 1) -> pie_trio.runtime.a   "
        "[modules involved: pie_trio.runtime.a, pie_trio.runtime.b, pie_trio.runtime.c]",
    ]
