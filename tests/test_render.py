"""Plan pictures: the rich table, the summary, Graphviz DOT and the SVG fallback."""

from __future__ import annotations

import io
import re
import shutil

import networkx as nx
import pytest
from rich.console import Console

from partitioner.cli.render import (
    PALETTE,
    RenderError,
    fmt_bytes,
    fmt_time,
    group_nodes,
    plan_to_dot,
    render_svg,
    stage_table,
    summary,
)
from partitioner.planner.cost import DeviceSpec
from partitioner.planner.plan import make_plan


def _graph() -> nx.DiGraph:
    """x -> layers.0.fc -> layers.0.act -> layers.1.fc -> layers.1.act -> head -> out."""
    g = nx.DiGraph(model="Toy")
    names = [
        ("x", "", "placeholder"),
        ("fc0", "layers.0.fc", "call_module"),
        ("act0", "layers.0.act", "call_function"),
        ("fc1", "layers.1.fc", "call_module"),
        ("act1", "layers.1.act", "call_function"),
        ("head", "head", "call_module"),
        ("add", "", "call_function"),
    ]
    for order, (name, module, op) in enumerate(names):
        g.add_node(
            name,
            time=0.0 if op == "placeholder" else 1e-3 * (order + 1),
            param_bytes=4096 if op == "call_module" else 0,
            out_bytes=1000 * (order + 1),
            act_bytes=100,
            flops=0,
            op=op,
            target=name,
            module=module,
            order=order,
        )
    for u, v in zip(names, names[1:], strict=False):
        g.add_edge(u[0], v[0])
    g.add_edge("x", "add")  # a skip connection crossing both stages
    return g


def _plan(graph: nx.DiGraph):
    assignment = {v: (0 if graph.nodes[v]["order"] <= 2 else 1) for v in graph.nodes}
    devices = [DeviceSpec("cpu:0", memory=10**6), DeviceSpec("cpu:1", speed=2.0)]
    return make_plan(
        graph, assignment, devices, lower_bound=0.0, status="optimal", solver="test", model="Toy"
    )


def _text(renderable) -> str:
    buf = io.StringIO()
    Console(file=buf, width=200).print(renderable)
    return buf.getvalue()


def test_formats() -> None:
    assert fmt_bytes(0) == "0 B"
    assert fmt_bytes(1500) == "1.5 KB"
    assert fmt_bytes(16e9) == "16 GB"
    assert fmt_bytes(None) == "-"
    assert fmt_time(0.00123) == "1.23 ms"
    assert fmt_time(2.0) == "2 s"
    assert fmt_time(5e-6) == "5 µs"
    assert fmt_time(0) == "0 s"


def test_stage_table_has_a_row_per_stage() -> None:
    graph = _graph()
    plan = _plan(graph)
    text = _text(stage_table(plan))
    for column in ("device", "nodes", "first op", "last op", "compute", "bytes in", "memory"):
        assert column in text
    assert "cpu:0" in text and "cpu:1" in text
    assert "/ 1 MB" in text  # the memory limit is shown next to the use
    labels = dict(summary(plan))
    assert labels["gap"].endswith("(optimal)")
    assert "per micro-batch" in labels["bottleneck"]


def test_group_nodes_cuts_module_paths_to_fit() -> None:
    graph = _graph()
    assignment = _plan(graph).assignment
    fine = group_nodes(graph, assignment, max_groups=100)
    assert fine["fc0"] == ("layers.0.fc", 0)
    assert fine["x"] == ("x", 0)  # inputs keep their own box
    assert fine["add"] == ("head", 1)  # outside any module: joins its producer's box
    coarse = group_nodes(graph, assignment, max_groups=5)
    assert coarse["fc0"] == coarse["act0"] == ("layers.0", 0)
    assert len(set(coarse.values())) == 4
    whole = group_nodes(graph, assignment, max_groups=3)  # one box per stage, and the input
    assert set(whole.values()) == {("x", 0), ("(model)", 0), ("(model)", 1)}


def test_dot_colours_stages_and_labels_cut_edges() -> None:
    graph = _graph()
    plan = _plan(graph)
    dot = plan_to_dot(plan, graph)
    assert dot.startswith('digraph "Toy" {') and dot.rstrip().endswith("}")
    assert dot.count("subgraph cluster_") == 2
    assert PALETTE[0] in dot and PALETTE[1] in dot
    cut = [line for line in dot.splitlines() if "penwidth=2" in line]
    # act0 -> fc1 (3 KB) and x -> add (1 KB) cross from stage 0 to stage 1
    labels = sorted(re.search(r'label="([^"]+)"', line).group(1) for line in cut)
    assert labels == ["1 KB", "3 KB"]
    # every edge endpoint is a declared box
    boxes = set(re.findall(r"^\s+(g\d+) \[", dot, re.M))
    for a, b in re.findall(r"(g\d+) -> (g\d+)", dot):
        assert a in boxes and b in boxes


def test_dot_without_graph_draws_the_stage_chain() -> None:
    plan = _plan(_graph())
    dot = plan_to_dot(plan)
    assert "s0 -> s1" in dot
    assert "stage 1: cpu:1" in dot


def test_dot_quotes_odd_names() -> None:
    graph = _graph()
    nx.relabel_nodes(graph, {"head": 'he"ad'}, copy=False)
    plan = _plan(graph)
    dot = plan_to_dot(plan, graph)
    assert 'digraph "Toy"' in dot
    assert '"he"ad' not in dot


def test_render_svg_without_graphviz_says_how_to_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RenderError, match="apt-get install graphviz"):
        render_svg("digraph {}", str(tmp_path / "plan.svg"))


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_render_svg_with_graphviz(tmp_path) -> None:
    graph = _graph()
    path = tmp_path / "plan.svg"
    render_svg(plan_to_dot(_plan(graph), graph), str(path))
    assert "<svg" in path.read_text()
