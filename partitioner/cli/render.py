"""Pictures of a plan: a rich table, a summary, and Graphviz DOT coloured by stage.

Library code: everything here returns text or renderables; the CLI prints them.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
from rich.box import SIMPLE_HEAD
from rich.markup import escape
from rich.table import Table

from partitioner.errors import ModelSplitError
from partitioner.planner.cost import fmt_bytes
from partitioner.planner.plan import Plan

__all__ = [
    "PALETTE",
    "RenderError",
    "fmt_bytes",
    "fmt_time",
    "plain_table",
    "group_nodes",
    "plan_to_dot",
    "render_svg",
    "stage_table",
    "summary",
    "training_summary",
]

#: ColorBrewer Set3: one fill colour per stage, cycling after twelve.
PALETTE = (
    "#8dd3c7",
    "#ffffb3",
    "#bebada",
    "#fb8072",
    "#80b1d3",
    "#fdb462",
    "#b3de69",
    "#fccde5",
    "#d9d9d9",
    "#bc80bd",
    "#ccebc5",
    "#ffed6f",
)

#: Most boxes a DOT picture of a whole graph shows before modules are merged upward.
MAX_GROUPS = 60

INSTALL_GRAPHVIZ = (
    "install Graphviz (apt-get install graphviz, brew install graphviz, or "
    "conda install graphviz) and run again, or render the .dot file elsewhere"
)


class RenderError(ModelSplitError):
    """A picture could not be drawn (the Graphviz program is missing or failed)."""


def fmt_time(seconds: float) -> str:
    """``0.00123`` -> ``"1.23 ms"``."""
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds == 0:
        return "0 s"
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def plain_table(title: str | None = None) -> Table:
    """A table with a rule under the header and one space between columns (fits 80 columns)."""
    return Table(
        title=title,
        title_justify="left",
        box=SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=0,
    )


def stage_table(plan: Plan, title: str | None = None) -> Table:
    """One row per stage: device, nodes, first and last op, compute, bytes in, cost, memory.

    Numbers never wrap; on a narrow terminal the op names are cut with an ellipsis.
    """
    table = plain_table(title)
    for name in ("stage", "device", "nodes", "first op", "last op"):
        text = name in ("device", "first op", "last op")
        table.add_column(
            name,
            justify="left" if text else "right",
            no_wrap=True,
            overflow="ellipsis",
            min_width=6 if text else len(name),
            max_width=28 if text else None,
        )
    for name in ("compute", "bytes in", "cost", "params", "memory"):
        table.add_column(name, justify="right", no_wrap=True, min_width=7)
    specs = {d.name: d for d in plan.device_specs}
    for j, s in enumerate(plan.stages):
        spec = specs.get(s.device)
        speed = spec.speed if spec is not None else 1.0
        memory = fmt_bytes(s.memory)
        if spec is not None and spec.memory is not None:
            memory += f" / {fmt_bytes(spec.memory)}"
        cost = fmt_time(s.cost)
        if s.cost >= plan.bottleneck > 0:
            cost = f"[bold]{cost}[/bold]"
        table.add_row(
            str(j),
            escape(s.device),
            str(s.nodes),
            escape(s.first or "-"),
            escape(s.last or "-"),
            fmt_time(s.time / speed),
            fmt_bytes(s.in_bytes),
            cost,
            fmt_bytes(s.param_bytes),
            memory,
        )
    return table


def summary(plan: Plan) -> list[tuple[str, str]]:
    """The plan's headline figures as (label, value) pairs (`training_summary` for a plan
    with a schedule)."""
    if plan.schedule is not None:
        return training_summary(plan)
    n, m = plan.num_stages, max(1, plan.chunks)
    # balanced-cut proves its optimum on bytes; the gap still compares the bottleneck.
    for_cut = " for the cut" if plan.objective == "balanced-cut" else ""
    return [
        ("model", plan.model or "?"),
        ("objective", plan.objective),
        ("bottleneck", f"{fmt_time(plan.bottleneck)} per micro-batch"),
        ("lower bound", fmt_time(plan.lower_bound)),
        ("gap", f"{100 * plan.gap:.2f}% ({plan.status}{for_cut})"),
        ("communicated", f"{fmt_bytes(plan.comm_bytes)} per micro-batch"),
        ("batch time", f"~{fmt_time((m + n - 1) * plan.bottleneck)} ({m} micro-batches)"),
        ("solver", f"{plan.solver} in {fmt_time(plan.solve_time)}"),
    ]


def training_summary(plan: Plan) -> list[tuple[str, str]]:
    """A training plan's figures: the schedule, the step time against its bound, the peak
    memory of each device, the forward figures per micro-batch, and the planner's notes."""
    v = plan.virtual_stages
    layout = f"{v} stages per device" if v > 1 else "one stage per device"
    recompute = "recomputing each stage's forward" if plan.checkpoint else "no recomputation"
    specs = {d.name: d for d in plan.device_specs}
    peaks = []
    for name, peak in zip(plan.device_names, plan.peak_memory or [], strict=False):
        limit = specs[name].memory
        peaks.append(
            f"{name} {fmt_bytes(peak)}" + (f" / {fmt_bytes(limit)}" if limit is not None else "")
        )
    rows = [
        ("model", plan.model or "?"),
        ("schedule", f"{plan.schedule}, {plan.chunks} micro-batches, {layout}, {recompute}"),
        ("step time", f"{fmt_time(plan.step_time or 0.0)} per training step (predicted)"),
        ("lower bound", f"{fmt_time(plan.lower_bound)} per step"),
        ("gap", f"{100 * plan.gap:.2f}% of the step time ({plan.status})"),
        ("peak memory", ", ".join(peaks) or "-"),
        ("bottleneck", f"{fmt_time(plan.bottleneck)} per micro-batch, forward only"),
        ("communicated", f"{fmt_bytes(plan.comm_bytes)} per micro-batch, each way"),
        ("solver", f"{plan.solver} in {fmt_time(plan.solve_time)}"),
    ]
    return rows + [("note", note) for note in plan.notes]


#: What DOT cannot take verbatim inside a quoted string: control characters (a newline,
#: a carriage return, ...) and lone surrogates, which no encoder writes.
_UNSAFE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_VISIBLE = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _VISIBLE.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def _quote(*lines: str) -> str:
    """A DOT quoted string showing ``lines`` one under another, each exactly as written.

    Inside quotes DOT ends the string at a bare ``"``, joins the next line after a ``\\``
    at the end of one, and reads ``\\n``, ``\\l``, ``\\N``... in labels: so a backslash is
    doubled, a quote escaped and a control character shown as its escape (``\\n``,
    ``\\x00``). No name can end the string, break the line or add a statement.
    """
    parts = (
        _UNSAFE.sub(_visible, line).replace("\\", "\\\\").replace('"', '\\"') for line in lines
    )
    return '"' + "\\n".join(parts) + '"'


def _module_parts(graph: nx.DiGraph, v: str) -> list[str]:
    module = str(graph.nodes[v].get("module") or "")
    return module.split(".") if module else []


def group_nodes(
    graph: nx.DiGraph, assignment: Mapping[str, int], max_groups: int = MAX_GROUPS
) -> dict[str, tuple[str, int]]:
    """Map each node to a (label, stage) box: its module path cut at the deepest level
    that keeps at most ``max_groups`` boxes.

    Inputs keep their own box. A node outside any module (a ``F.gelu`` or a residual
    add in the model's own forward) joins the box of its latest producer on the same
    stage, so ``layers.0`` holds its Linear and the activation after it.
    """
    order = sorted(graph.nodes, key=lambda v: (int(graph.nodes[v].get("order", 0)), str(v)))
    rank = {v: i for i, v in enumerate(order)}
    parts = {v: _module_parts(graph, v) for v in graph.nodes}
    depth = max((len(p) for p in parts.values()), default=0)

    def at_depth(d: int) -> dict[str, tuple[str, int]]:
        keys: dict[str, tuple[str, int]] = {}
        for v in order:
            k = assignment[v]
            if parts[v] and graph.nodes[v].get("op") != "placeholder":
                keys[v] = (".".join(parts[v][:d]) if d else "(model)", k)
                continue
            same = [u for u in graph.predecessors(v) if assignment[u] == k and u in keys]
            inputs = graph.nodes[v].get("op") == "placeholder"
            if same and not inputs:
                keys[v] = keys[max(same, key=rank.__getitem__)]
            else:
                keys[v] = (v if inputs or d else "(model)", k)
        return keys

    best = at_depth(0)
    for d in range(1, depth + 1):
        trial = at_depth(d)
        if len(set(trial.values())) > max_groups:
            break
        best = trial
    return best


def plan_to_dot(plan: Plan, graph: nx.DiGraph | None = None, max_groups: int = MAX_GROUPS) -> str:
    """Graphviz DOT of ``graph`` coarsened to module boxes, one cluster per stage.

    Edges that cross stages are red and labelled with the bytes they carry per
    micro-batch (each producer counted once per receiving box). Without a graph
    (``modelsplit show``) it draws the stage chain from the plan's own figures.
    """
    if graph is None:
        return _stage_chain_dot(plan)
    groups = group_nodes(graph, plan.assignment, max_groups)
    boxes: dict[tuple[str, int], dict[str, float]] = defaultdict(
        lambda: {"nodes": 0, "time": 0.0, "param_bytes": 0}
    )
    for v, where in groups.items():
        data = graph.nodes[v]
        boxes[where]["nodes"] += 1
        boxes[where]["time"] += float(data.get("time", 0.0))
        boxes[where]["param_bytes"] += int(data.get("param_bytes", 0))
    ids = {b: f"g{i}" for i, b in enumerate(sorted(boxes, key=lambda b: (b[1], b[0])))}
    lines = _dot_header(plan, "TB", 'color="#777777"')
    for j, stage in enumerate(plan.stages):
        lines.append(f"  subgraph cluster_{j} {{")
        label = f"stage {j}: {stage.device}  (cost {fmt_time(stage.cost)})"
        lines.append(f'    label={_quote(label)}; style=dashed; color="#999999";')
        colour = PALETTE[j % len(PALETTE)]
        for where, figures in boxes.items():
            if where[1] != j:
                continue
            count = int(figures["nodes"])
            ops = f"{count} op" + ("s" if count != 1 else "")
            text = [where[0], f"{ops}, {fmt_time(figures['time'])}"]
            if figures["param_bytes"]:
                text.append(f"{fmt_bytes(figures['param_bytes'])} params")
            lines.append(f'    {ids[where]} [label={_quote(*text)}, fillcolor="{colour}"];')
        lines.append("  }")
    lines.extend(_dot_edges(graph, groups, ids))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_edges(
    graph: nx.DiGraph, groups: Mapping[str, tuple[str, int]], ids: Mapping[Any, str]
) -> list[str]:
    sent: dict[tuple[Any, Any], set[str]] = defaultdict(set)
    for u, v in graph.edges:
        a, b = groups[u], groups[v]
        if a != b:
            sent[(a, b)].add(u)
    lines = []
    for (a, b), producers in sorted(sent.items(), key=lambda e: (ids[e[0][0]], ids[e[0][1]])):
        if a[1] == b[1]:
            lines.append(f"  {ids[a]} -> {ids[b]};")
            continue
        nbytes = sum(int(graph.nodes[u].get("out_bytes", 0)) for u in producers)
        lines.append(
            f'  {ids[a]} -> {ids[b]} [label={_quote(fmt_bytes(nbytes))}, color="#d62728", '
            f'fontcolor="#d62728", penwidth=2];'
        )
    return lines


def _dot_header(plan: Plan, rankdir: str, edge_colour: str) -> list[str]:
    """The opening lines both pictures share: graph name, direction, box and edge style."""
    return [
        f"digraph {_quote(plan.model or 'plan')} {{",
        f"  rankdir={rankdir};",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        f'  edge [fontname="Helvetica", fontsize=9, {edge_colour}];',
    ]


def _stage_chain_dot(plan: Plan) -> str:
    lines = _dot_header(plan, "LR", 'color="#d62728", fontcolor="#d62728"')
    for j, s in enumerate(plan.stages):
        text = (
            f"stage {j}: {s.device}",
            f"{s.nodes} ops: {s.first or '-'} .. {s.last or '-'}",
            f"cost {fmt_time(s.cost)}, memory {fmt_bytes(s.memory)}",
        )
        colour = PALETTE[j % len(PALETTE)]
        lines.append(f'  s{j} [label={_quote(*text)}, fillcolor="{colour}"];')
    for j in range(1, plan.num_stages):
        label = _quote(f"in {fmt_bytes(plan.stages[j].in_bytes)}")
        lines.append(f"  s{j - 1} -> s{j} [label={label}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(dot: str, path: str, program: str = "dot", timeout: float = 60.0) -> None:
    """Render DOT text to an SVG file with the Graphviz ``dot`` program."""
    exe = shutil.which(program)
    if exe is None:
        raise RenderError(
            f"cannot write {path}: the Graphviz '{program}' program is not on PATH; "
            f"{INSTALL_GRAPHVIZ}"
        )
    try:
        done = subprocess.run(
            [exe, "-Tsvg", "-o", path],
            input=dot.encode(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise RenderError(f"Graphviz took over {timeout:.0f}s to draw {path}") from e
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise RenderError(
            f"Graphviz failed to draw {path}: {message[0] if message else done.returncode}"
        )


def stage_memory(plan: Plan) -> Sequence[int]:
    """Memory per stage in bytes (parameters + activations)."""
    return [s.memory for s in plan.stages]
