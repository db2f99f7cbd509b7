"""The house plan holds: no import circle in src/popguard, and dependencies point one way.

The import graph is read with `ast` (nothing is imported), so imports inside functions
and under TYPE_CHECKING count: they are still a tie between two modules.
docs/ARCHITECTURE.md draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "popguard"

# Bottom to top: a module may import its own folder and the folders below it.
LAYERS = [
    "",  # the shared leaves at the package's top: errors, paths, sqlite_util
    "pop3",
    "directory",
    "store",
    "net",
    "control",
    "services",
    "replication",
    "health",
    "web",
    "cli",
    "testing",
]
ENTRY_POINTS = {"popguard.__main__"}
MAX_TOP_LEVEL_MODULES = 4


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(f): f for f in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = package[: len(package) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                # `from popguard.net import tls` ties to the module tls, not to net's face.
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target.startswith("popguard") and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
    return found


def layer_of(module: str) -> int:
    parts = module.split(".")[1:]
    if parts and (PACKAGE / parts[0]).is_dir():
        return LAYERS.index(parts[0])
    return 0  # popguard itself and its top-level leaves


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_every_folder_has_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders <= set(LAYERS)


def test_dependencies_point_down_the_layers() -> None:
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module not in ENTRY_POINTS
        for target in targets
        if layer_of(target) > layer_of(module)
    )
    assert upward == []


def test_few_modules_stand_at_the_top() -> None:
    top = sorted(
        p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")
    )
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_the_checks_see_a_circle_and_an_upward_import() -> None:
    """The checks can fail: a made-up graph with a circle is caught, and so is a store
    module importing the health engine."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("popguard.health.engine") > layer_of("popguard.store.mounted")
    assert layer_of("popguard.errors") == 0
