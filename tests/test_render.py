"""Plan pictures: the rich table, the summary, Graphviz DOT and the SVG fallback."""

from __future__ import annotations

import io
import re
import shutil
from dataclasses import replace

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
from partitioner.planner.plan import Plan, make_plan


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


#: A name that ends a DOT string and adds statements unless its backslash is escaped too
#: (\\" would read as an escaped backslash, then the closing quote), breaks its line, and
#: ends in a backslash.
EVIL = 'a\\"]; evil -> x [\nb"\\'
#: How `plan_to_dot` writes it inside quotes: \\ for \, \" for ", \\n for the newline.
EVIL_DOT = 'a\\\\\\"]; evil -> x [\\\\nb\\"\\\\'


def _skeleton(dot: str) -> list[str]:
    """DOT's lines with every quoted string as Q and every box id as G, sorted."""
    bare = re.sub(r"\bg\d+\b", "G", re.sub(r'"(?:[^"\\]|\\.)*"', "Q", dot, flags=re.S))
    return sorted(bare.splitlines())


def _evil_plan() -> tuple[nx.DiGraph, Plan]:
    graph = _graph()
    nx.relabel_nodes(graph, {"x": EVIL}, copy=False)  # an input: its box shows its name
    plan = _plan(graph).on_devices([DeviceSpec(EVIL), DeviceSpec("cpu\t1\x00\r")])
    return graph, replace(plan, model=EVIL)


def test_dot_escapes_every_name_exactly() -> None:
    graph, plan = _evil_plan()
    dot = plan_to_dot(plan, graph)
    assert dot.startswith(f'digraph "{EVIL_DOT}" {{\n')
    assert f'[label="{EVIL_DOT}\\n1 op, 0 s", fillcolor=' in dot
    assert f'label="stage 0: {EVIL_DOT}  (cost 5 ms)";' in dot
    assert 'label="stage 1: cpu\\\\t1\\\\x00\\\\r  (cost 11 ms)";' in dot
    chain = plan_to_dot(plan)
    assert f's0 [label="stage 0: {EVIL_DOT}\\n3 ops: {EVIL_DOT} .. act0\\n' in chain


def test_dot_names_add_no_statement() -> None:
    graph, plan = _evil_plan()
    plain = _graph()
    assert _skeleton(plan_to_dot(plan, graph)) == _skeleton(plan_to_dot(_plan(plain), plain))
    assert _skeleton(plan_to_dot(plan)) == _skeleton(plan_to_dot(_plan(plain)))


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_graphviz_reads_one_label_per_name() -> None:
    import json
    import subprocess

    graph, plan = _evil_plan()
    for dot in (plan_to_dot(plan, graph), plan_to_dot(plan)):
        done = subprocess.run(
            ["dot", "-Tjson"], input=dot.encode(), capture_output=True, timeout=60, check=True
        )
        drawn = json.loads(done.stdout)
        names = {o["name"] for o in drawn["objects"]}
        assert names <= {"cluster_0", "cluster_1", *(f"g{i}" for i in range(6)), "s0", "s1"}
        assert drawn["name"] == EVIL_DOT.replace('\\"', '"')  # as DOT reads the quotes
        labels = [o.get("label", "") for o in drawn["objects"]]
        assert any(f"stage 0: {drawn['name']}" in label for label in labels)
