"""The layout promises of docs/architecture.md: imports run one way, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("modelsplit", "partitioner", "runtime")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (never run, so never a cycle)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    lines.add(getattr(sub, "lineno", -1))
    return lines


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every module of the project that `name` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in mods:  # ``from pkg import submodule`` imports the submodule
                    found.add(sub)
                elif base in mods:
                    found.add(base)
    found.discard(name)
    return found


def import_graph() -> nx.DiGraph:
    mods = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        graph.add_edges_from((name, target) for target in _imports(name, path, mods))
    return graph


def test_no_import_cycles() -> None:
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_cycle_check_sees_function_level_imports(tmp_path: Path) -> None:
    """The checker itself: a cycle through an import inside a function is still a cycle."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    mods = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert _imports("b", mods["b"], mods) == {"a"}
    assert _imports("a", mods["a"], mods) == {"b"}


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        (
            "partitioner.planner",
            (
                "partitioner.capture",
                "partitioner.profiling",
                "partitioner.splitting",
                "partitioner.splitter",
                "partitioner.cli",
                "runtime",
            ),
        ),
        (
            "partitioner.capture",
            (
                "partitioner.splitter",
                "partitioner.cli",
                "partitioner.profiling",
                "partitioner.splitting",
            ),
        ),
        (
            "partitioner.profiling",
            ("partitioner.splitter", "partitioner.cli", "partitioner.splitting"),
        ),
        (
            "partitioner.splitting",
            ("partitioner.splitter", "partitioner.cli", "partitioner.profiling"),
        ),
        ("partitioner.splitter", ("partitioner.cli",)),
        ("runtime", ("partitioner.cli", "partitioner.splitter", "partitioner.planner.solver")),
    ],
)
def test_imports_run_one_way(layer: str, forbidden: tuple[str, ...]) -> None:
    graph = import_graph()
    bad = [
        (u, v)
        for u, v in graph.edges
        if (u == layer or u.startswith(layer + "."))
        and any(v == f or v.startswith(f + ".") for f in forbidden)
    ]
    assert not bad, f"{layer} must not import {forbidden}: {bad}"


def test_planner_core_is_torch_free_in_source() -> None:
    for name, path in _modules().items():
        if name.startswith("partitioner.planner"):
            text = path.read_text()
            assert "import torch" not in text, f"{name} imports torch"


def test_modules_are_small() -> None:
    big = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_submodule_shadows_a_public_function() -> None:
    import partitioner

    for name in partitioner.__all__:
        assert not (ROOT / "partitioner" / f"{name}.py").exists(), name
        assert not (ROOT / "partitioner" / name).is_dir(), name
