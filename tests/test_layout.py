"""Layers point one way (flows -> tasks -> core): the core never imports Prefect, flows/ or tasks/,
tasks/ never imports flows/, and no import cycle exists among the project's modules.

Read from the source with ast, so an import inside a function counts as much as one at the top:
a lazy import still ties the layers together, it only hides it until the function runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ROOT

CORE = ROOT / "src" / "peftflow"
SHELLS = (ROOT / "flows", ROOT / "tasks")


def _module_name(path: Path) -> str:
    """src/peftflow/rlhf/cli.py -> peftflow.rlhf.cli; flows/__init__.py -> flows."""
    rel = path.relative_to(ROOT / "src" if path.is_relative_to(CORE) else ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    paths = [*CORE.rglob("*.py"), *(p for shell in SHELLS for p in shell.glob("*.py"))]
    return {_module_name(p): p for p in paths}


MODULES = _modules()


def _imported_names(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) for every import in the file, wherever it is: ``from a import b`` gives
    ``a.b`` (a submodule, or a name in ``a``: the caller keeps what exists), relative imports resolved;
    ``importlib.import_module("a.b")`` with a literal name counts too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*")
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def _project_target(name: str) -> str | None:
    """The project module an imported name loads: itself, or its longest prefix that is a module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def _graph() -> dict[str, dict[str, int]]:
    """module -> {project module it imports: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges = graph.setdefault(module, {})
        for line, name in _imported_names(module, path):
            target = _project_target(name)
            if target is not None and target != module:
                edges.setdefault(target, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
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
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    """The shortest cycle through the component's first module, each step with its import's line."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = [start]
    while start not in came_from:  # breadth first, back to the start: an SCC always leads back
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w in members and w not in came_from:
                came_from[w] = v
                queue.append(w)
    path = [start]
    while path[-1] != start or len(path) == 1:
        path.append(came_from[path[-1]])
    path.reverse()
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(path, path[1:], strict=False)]
    return f"import cycle among {', '.join(component)}: " + "; ".join(steps)


def _offenders(where: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    found: dict[tuple[str, int], str] = {}
    for path in where:
        for line, name in _imported_names(_module_name(path), path):
            key = (str(path.relative_to(ROOT)), line)
            if name.split(".")[0] in forbidden and key not in found:  # `from a import b`: a, not also a.b
                found[key] = name
    return [f"{file}:{line} imports {name}" for (file, line), name in sorted(found.items())]


def test_the_module_graph_sees_the_whole_project():
    assert {
        "peftflow.cli",
        "peftflow.rlhf.cli",
        "peftflow.methods",
        "flows",
        "flows.pipeline",
        "tasks.pipeline",
    } <= set(MODULES)
    graph = _graph()
    assert "peftflow.pipeline" in graph["tasks.pipeline"]  # `from peftflow import pipeline`: the submodule
    assert "tasks.pipeline" in graph["flows.pipeline"]  # `from tasks import pipeline as steps`


def test_core_never_imports_prefect_flows_or_tasks():
    offenders = _offenders(sorted(CORE.rglob("*.py")), ("prefect", "flows", "tasks"))
    assert not offenders, "the core (src/peftflow) must not depend on the shells:\n" + "\n".join(offenders)


def test_tasks_never_import_flows():
    offenders = _offenders(sorted((ROOT / "tasks").glob("*.py")), ("flows",))
    assert not offenders, "tasks/ sit below flows/:\n" + "\n".join(offenders)


def test_no_import_cycles():
    graph = _graph()
    cycles = [_describe(c, graph) for c in _cycles(graph)]
    assert not cycles, "\n".join(cycles)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    (component,) = _cycles(graph)
    assert component == ["a", "b", "c"]
    assert (
        _describe(component, graph) == "import cycle among a, b, c: a (line 1) -> b; b (line 2) -> c; c (line 3) -> a"
    )
