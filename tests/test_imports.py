"""The package's modules import each other without cycles: read from the source with `ast`, so the
check costs no imports. Function-level imports count too (a cycle hidden behind a lazy import still
ties two modules' changes together); `if TYPE_CHECKING:` blocks do not, as they never run."""

from __future__ import annotations

import ast
import graphlib
import importlib
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "nanoseek").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        out.append(node)
        todo += ast.iter_child_nodes(node)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a `from pkg import sub` names the submodule)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    graph[mod].add(name)
    return graph


def test_every_module_imports_and_the_graph_sees_them():
    graph = import_graph()
    assert "nanoseek.model.transformer" in graph["nanoseek.checkpoint"]
    assert "nanoseek.data.tasks" in graph["nanoseek.data.rewards"]
    for module in sorted(graph):
        if not module.endswith("__main__"):  # runs the CLI
            importlib.import_module(module)


def test_no_import_cycles():
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle in the package: {' -> '.join(e.args[1])}") from None
