"""The house's layering (../shared/DESIGN.md, issue 14): read from the source, every import counted, the lazy
ones inside functions too, so a shortcut taken in a hurry fails here rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "renderfarm"

# Rooms that never import one another: each talks to the others through Redis (the Store) only.
SIDEWAYS = {"client", "scheduler", "dashboard", "actors"}
# What each lower room may not import (it would run back up the house).
NEVER = {
    "errors": {"*"},
    "jobs": {"cluster", "planning", "actors", "scheduler", "client", "dashboard", "cli", "farm"},
    "planning": {"actors", "scheduler", "client", "dashboard", "cli", "farm"},
    "cluster": {"planning", "actors", "scheduler", "client", "dashboard", "cli", "farm"},
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports() -> dict[str, set[str]]:
    """module -> the renderfarm modules it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("renderfarm"):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("renderfarm")}
        graph[name] = targets
    return graph


GRAPH = _imports()


def _room_of_module(module: str) -> str:
    room = _room(module)
    return room.removesuffix(".py")


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_sideways_or_upward_import(module):
    room = _room_of_module(module)
    for target in GRAPH[module]:
        other = _room_of_module(target)
        if other == room or not other:
            continue
        if room in SIDEWAYS:
            assert other not in SIDEWAYS, f"{module} imports {target}: {room}/ and {other}/ talk through Redis only"
        banned = NEVER.get(room, set())
        assert "*" not in banned, f"{module} imports {target}: errors.py imports nothing of renderfarm"
        assert other not in banned, f"{module} imports {target}: {room} must not import {other}"


def test_no_import_cycle_between_modules():
    """Top-level and lazy imports alike: a cycle means two modules that cannot be understood apart."""
    modules = set(GRAPH)

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {t for t in map(resolve, GRAPH[m]) if t and t != m and not m.startswith(t + ".")} for m in GRAPH}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)


def test_no_module_is_crowded():
    """STYLE.md: split a module when it passes ~600 lines."""
    crowded = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
               if (n := len(p.read_text().splitlines())) > 600}
    assert not crowded, crowded
