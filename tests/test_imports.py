"""The package's modules import each other without cycles: read from the source with `ast`, so the
check costs no imports. Function-level imports count too (a cycle hidden behind a lazy import still
ties two modules' changes together); `if TYPE_CHECKING:` blocks do not, as they never run. The same
walk checks that every third-party module the package imports is a dependency pyproject.toml declares,
so a wheel installed with only those runs; and setuptools reads pyproject.toml without a deprecation
(each one becomes an error in a later release, breaking `pip install .`), ships every data file in the
wheel and, in the sdist, everything the tests read."""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import graphlib
import importlib
import importlib.metadata
import io
import re
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

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


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_keys(requirements: list[str]) -> set[str]:
    """The distribution names of requirement strings ("torch>=2.6" -> "torch")."""
    return {_dist_key(re.split(r"[\s<>=!~;\[]", r)[0]) for r in requirements}


def test_every_third_party_import_is_a_declared_dependency():
    project = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]
    required = _dist_keys(project["dependencies"])
    optional = _dist_keys([r for extra in project["optional-dependencies"].values() for r in extra])
    dists = importlib.metadata.packages_distributions()
    problems = []
    for mod, path in sorted(_modules().items()):
        tree = ast.parse(path.read_text())
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top == "nanoseek":
                    continue
                names = {_dist_key(d) for d in [*dists.get(top, []), top]}
                if names & required:
                    continue
                if names & optional and node not in tree.body:  # an extra, imported only when used
                    continue
                problems.append(f"{mod}:{node.lineno} imports {top}")
    assert not problems, "imports of modules pyproject.toml does not declare as dependencies:\n" + "\n".join(
        problems
    )


def test_setuptools_reads_pyproject_without_deprecations_and_ships_every_data_file():
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), SRC.parent / "pyproject.toml")
    globs = dist.package_data["nanoseek"]
    for path in (SRC / "nanoseek").rglob("*"):
        rel = path.relative_to(SRC / "nanoseek").as_posix()
        if path.is_file() and path.suffix not in (".py", ".pyc"):
            assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in the wheel (package-data)"


def test_the_sdist_carries_what_its_tests_read(tmp_path, monkeypatch):
    """Distributions build and test from the sdist, so its tests/ must run there: setuptools alone
    ships tests/test_*.py without conftest.py, the helpers, the golden files, and the benchmarks and
    docs that tests read."""
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    root = SRC.parent
    monkeypatch.chdir(root)  # MANIFEST.in is read from the working directory
    dist = apply_configuration(Distribution({"script_name": "pyproject.toml"}), root / "pyproject.toml")
    dist.get_command_obj("egg_info").egg_base = str(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        dist.run_command("egg_info")
    shipped = set((tmp_path / "nanoseek.egg-info" / "SOURCES.txt").read_text().splitlines())
    read = {
        path.relative_to(root).as_posix()
        for folder in ("tests", "benchmarks", "docs")
        for path in (root / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert not read - shipped, f"not in the sdist (MANIFEST.in): {sorted(read - shipped)}"


def test_the_top_level_api_is_listed_and_documented():
    """`dir(nanoseek)` (what IPython and editors complete from) lists the lazily loaded names, and each
    exported class and function says what it does in its own docstring."""
    import nanoseek

    assert set(nanoseek.__all__) <= set(dir(nanoseek))
    for name in nanoseek.__all__:
        obj = getattr(nanoseek, name)
        if callable(obj):
            doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
            # a dataclass without one gets its signature as __doc__: no description
            assert doc and not doc.startswith(f"{name}("), name
