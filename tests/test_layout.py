"""The package layout reads as the data flow: no import cycle between ame-hf's modules (function-local
imports included: none may dodge a cycle), every module says its one job, none grows into several."""

from __future__ import annotations

import ast
from pathlib import Path

import ame_hf

PACKAGE = Path(ame_hf.__file__).parent
MODULES = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}


def imports_of(path: Path) -> set[str]:
    """ame-hf modules a file imports, anywhere in it (top level, functions, TYPE_CHECKING blocks)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            found.update(n for n in names if n in MODULES)
    return found - {path.stem}


def test_the_import_graph_has_no_cycle():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join((*trail, name))
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, (*trail, name))
        state[name] = "done"

    for name in sorted(graph):
        visit(name, ())


def test_every_module_states_its_job_and_stays_small():
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        assert ast.get_docstring(ast.parse(text)), f"{name}.py has no module docstring saying its job"
        assert text.count("\n") <= 400, f"{name}.py has {text.count(chr(10))} lines: split its jobs"


def test_the_readme_table_lists_every_module_in_import_order():
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## How the code is laid out"):]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    listed = [m.strip("` ").removesuffix(".py") for row in rows for m in row.split("|")[1].split(",")]
    assert sorted(listed) == sorted(MODULES)
    position = {name: i for i, name in enumerate(listed)}
    for name, path in MODULES.items():
        for dep in imports_of(path):
            assert position[dep] > position[name], f"{name} imports {dep}, listed above it in the README"
