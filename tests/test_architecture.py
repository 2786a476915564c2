"""The package's import graph, as docs/architecture.rst states it: no cycle, and entry points
(the modules behind `python -m mmm.<entry>`) import library modules only, never each other."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "mmm"
ENTRY_POINTS = {"mmm.preprocess", "mmm.train_tokenizer", "mmm.train", "mmm.sample", "mmm.evaluate", "mmm.serve"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the mmm modules it imports (module level and inside functions)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmm"):
                for alias in node.names:  # `from mmm.data import layout` names a module
                    found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("mmm"))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def entry_point_of(module: str) -> str | None:
    return next((e for e in ENTRY_POINTS if module == e or module.startswith(e + ".")), None)


def test_entry_points_import_no_other_entry_point():
    crossing = [(m, dep) for m, deps in imports().items() for dep in deps
                if entry_point_of(dep) not in (None, entry_point_of(m)) and m != "mmm"]
    assert not crossing, f"entry points importing other entry points: {crossing}"


def test_no_import_cycle():
    graph, state, cycles = imports(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [m, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # A package's __init__ and its own submodules importing each other is Python's normal layout.
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    real = [c for c in cycles if not any(p in c and all(x == p or x.startswith(p + ".") for x in c) for p in packages)]
    assert not real, f"import cycles: {real}"
