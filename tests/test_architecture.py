"""The package's import graph against docs/architecture.rst: the layers its table states (read
from the page itself), no cycle, and every command of the package listed on the page."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "mmm"
PAGE = REPO / "docs" / "architecture.rst"


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
                    found.add(
                        f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                    )
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("mmm"))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def page_layers() -> list[list[str]]:
    """The packages of each layer, lowest first, from the page's "Layers, lowest first" table."""
    table = PAGE.read_text().split(".. list-table:: Layers, lowest first", 1)[1]
    rows: list[list[str]] = []  # cells of each row, the header row first
    for line in table.splitlines()[1:]:
        if line and not line.startswith("   "):  # the end of the directive
            break
        if line.startswith("   * - "):
            rows.append([line[7:]])
        elif line.startswith("     - "):
            rows[-1].append(line[7:])
        elif line.strip() and rows:
            rows[-1][-1] += " " + line.strip()
    return [re.findall(r"``(mmm[\w.]*)``", cells[1]) for cells in rows[1:]]


def package_of(module: str, layers: list[list[str]]) -> str | None:
    """The listed package a module belongs to (the longest matching name)."""
    names = [p for layer in layers for p in layer if module == p or module.startswith(p + ".")]
    return max(names, key=len, default=None)


def layer_violations(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Imports the layer rule forbids: into a higher layer, or into another package of one's own."""
    rank = {p: i for i, layer in enumerate(layers) for p in layer}
    bad = []
    for module, deps in sorted(graph.items()):
        if module == "mmm":  # the package's face (`from mmm import MMM`) is exempt
            continue
        own = package_of(module, layers)
        for dep in sorted(deps):
            theirs = package_of(dep, layers)
            if theirs != own and rank[theirs] >= rank[own]:
                bad.append(f"{module} imports {dep} ({theirs} is not below {own})")
    return bad


def test_every_module_belongs_to_a_listed_package():
    layers = page_layers()
    assert len(layers) >= 5, layers
    unlisted = sorted(m for m in imports() if m != "mmm" and package_of(m, layers) is None)
    assert not unlisted, f"modules in no package of the page's layer table: {unlisted}"


def test_imports_follow_the_layers_of_the_page():
    assert layer_violations(imports(), page_layers()) == []


def test_an_upward_import_is_caught():
    """The check itself: an import from the model into generation, or between two commands, fails."""
    layers = page_layers()
    graph = imports()
    graph["mmm.model.transformer"] = graph["mmm.model.transformer"] | {"mmm.generation.grammar"}
    graph["mmm.sample"] = graph["mmm.sample"] | {"mmm.train"}
    assert layer_violations(graph, layers) == [
        "mmm.model.transformer imports mmm.generation.grammar (mmm.generation is not below mmm.model)",
        "mmm.sample imports mmm.train (mmm.train is not below mmm.sample)",
    ]


def test_every_command_is_on_the_page():
    """Modules runnable with `python -m` (a `__main__.py`, or a `__main__` guard) are listed."""
    commands = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name == "__main__.py":
            commands.add(module_name(path.parent / "__init__.py"))
        elif re.search(r'^if __name__ == "__main__":', text, re.M):
            commands.add(module_name(path))
    listed = set(re.findall(r"``python -m (mmm[\w.]*)``", PAGE.read_text()))
    assert commands <= listed, f"commands missing from docs/architecture.rst: {sorted(commands - listed)}"
    assert listed <= commands, f"listed commands that do not exist: {sorted(listed - commands)}"


def test_no_import_cycle():
    graph, state, cycles = imports(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep) :] + [dep] if dep in path else [m, dep])
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
