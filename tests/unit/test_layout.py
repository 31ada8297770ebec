"""The package's rooms and the one way its imports run (docs/architecture.md).

Every import of the package, at module level or inside a function, must point to a lower layer
or stay in its own room, and the module graph must have no cycle. The wheel ships every room
and no harness (testing/ and tests/ are not in it); ray is imported in launch/ alone.
"""
from __future__ import annotations

import ast
from pathlib import Path

import tomllib
from setuptools import find_packages

from testing.machine import ROOT

PACKAGE = ROOT / "distributed_step"
# Low to high: a module may import from its own room or from a lower one, never from a higher one.
# The top-level modules the loop is made of: one room, whose modules may import each other.
CORE = {"background_save", "model", "optim", "step", "checkpoint", "rundir", "faults", "cadence", "outcome", "recovery"}
LAYERS = [
    {"config"},
    {"data"},
    {"parallel"},
    {"observe"},
    {"planner"},
    {"core"},
    {"train"},
    {"tools", "launch"},
    {"__main__", "__init__"},
]


def room(module: str) -> str:
    """'distributed_step.parallel.ddp' -> 'parallel'; 'distributed_step.step' -> 'core'."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return "core" if len(parts) == 2 and parts[1] in CORE else parts[1]


def layer(module: str) -> int:
    return next(i for i, rooms in enumerate(LAYERS) if room(module) in rooms)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)


def imports(path: Path) -> set[str]:
    """Every module of the package that `path` imports, wherever the import statement is."""
    found, package = set(), module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in known} - {module_name(path)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_room_of_a_layer():
    unplaced = [m for m in graph() if not any(room(m) in rooms for rooms in LAYERS)]
    assert not unplaced, f"add these rooms to LAYERS (and docs/architecture.md): {unplaced}"


def test_imports_run_one_way():
    upward = [f"{src} imports {dst}" for src, targets in graph().items() for dst in sorted(targets)
              if room(dst) != room(src) and layer(dst) >= layer(src) and room(dst) != "__init__"]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt == "distributed_step":
                continue  # the package's __init__ imports only config and (lazily) train
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_ray_only_in_launch_and_no_harness_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
        assert not names & {"tests", "testing"}, f"{path}: the product imports a test harness"
        if "ray" in names:
            assert room(module_name(path)) == "launch", f"{path} imports ray outside launch/"


def test_the_wheel_ships_every_room_and_no_harness():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(find_packages(str(ROOT), include=include))
    rooms = {f"distributed_step.{p.name}" for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    assert rooms <= shipped, f"a room without __init__.py is not shipped: {sorted(rooms - shipped)}"
    assert "distributed_step.launch" in shipped
    assert not {p for p in shipped if not p.startswith("distributed_step")}
