"""The house's floors: which package may import which, and no import loops between files.

Drawn from the ground up (docs/architecture.md shows the same picture)::

    edgefleet                         the roof: the CLI root and the demo
    compiler                          imports the agent's runtimes to validate with them
    agent    fleet                    never each other
    ota      hw_profiles
    contracts                         imports no edgefleet package

Imports are read with ``ast`` from every module, those inside functions and under
``TYPE_CHECKING`` included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED: dict[str, set[str]] = {
    "contracts": set(),
    "hw_profiles": {"contracts"},
    "ota": {"contracts"},
    "agent": {"contracts", "ota", "hw_profiles"},
    "fleet": {"contracts", "ota", "hw_profiles"},
    "compiler": {"contracts", "hw_profiles", "agent"},
    "edgefleet": {"contracts", "hw_profiles", "ota", "agent", "fleet", "compiler"},
}
"""Each package and the other edgefleet packages it may import."""

CONTRACTS_THIRD_PARTY = {"pydantic", "numpy", "typer", "rich"}
"""What the contracts may import at module level besides the standard library (typer and
rich only in ``contracts.cli``, the command line's conventions)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in ALLOWED
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _imports(name: str, path: Path, *, top_level_only: bool = False) -> Iterator[str]:
    """Absolute names of what ``path`` (module ``name``) imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base)
                module = f"{prefix}.{node.module}" if node.module else prefix
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {
            target
            for target in _imports(name, path)
            if target in modules and not _is_ancestor(target, name)
        }
        for name, path in modules.items()
    }


def _is_ancestor(package: str, module: str) -> bool:
    """``module`` itself, or a package it sits in (imported with it anyway)."""
    return module == package or module.startswith(package + ".")


def test_packages_import_only_the_floors_below_them() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if (src := module.split(".")[0]) != (dst := target.split(".")[0])
        and dst not in ALLOWED[src]
    )
    assert not wrong, "imports against the layout (docs/architecture.md):\n" + "\n".join(wrong)


def test_no_import_loop_between_files() -> None:
    graph = _graph()
    # Tarjan's strongly connected components: a component of two or more files is a loop.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

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
                loops.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not loops, "files that import each other (directly or round a loop): " + str(loops)


@pytest.mark.parametrize(
    "module", sorted(name for name in _modules() if name.split(".")[0] == "contracts")
)
def test_contracts_stand_on_pydantic_and_numpy_alone(module: str) -> None:
    path = _modules()[module]
    outside = sorted(
        {
            target.split(".")[0]
            for target in _imports(module, path, top_level_only=True)
            if target.split(".")[0] not in sys.stdlib_module_names
            and target.split(".")[0] not in CONTRACTS_THIRD_PARTY | {"contracts", "__future__"}
        }
    )
    assert not outside, f"{module} needs {outside} to import"
