"""CostGraph builders for planner tests: hypothesis strategies and a transformer-like graph.

Strategies draw chains, diamonds, layered DAGs and transformer-like blocks with
random costs, and device lists with random speeds and memory limits.
`transformer_graph` is a deterministic operator-level graph shaped like GPT-2
(parameters as zero-time sources, views as zero-time nodes, a tied LM head).
"""

from __future__ import annotations

from typing import Any

import networkx as nx
from hypothesis import strategies as st

from partitioner.planner.cost import DeviceSpec

__all__ = [
    "chains",
    "cost_graphs",
    "device_lists",
    "diamonds",
    "layered_dags",
    "transformer_blocks",
    "transformer_graph",
]


def _node(g: nx.DiGraph, name: str, time: float, params: int, out: int, act: int) -> None:
    g.add_node(
        name,
        time=time,
        param_bytes=params,
        out_bytes=out,
        act_bytes=act,
        order=g.number_of_nodes(),
        op="call_function",
        target="op",
        module="",
    )


_times = st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 3.0, 5.0, 8.0])
_bytes = st.integers(min_value=0, max_value=64)


@st.composite
def _costed(draw: Any, edges: list[tuple[int, int]], n: int) -> nx.DiGraph:
    g = nx.DiGraph()
    for i in range(n):
        _node(g, f"v{i}", draw(_times), draw(_bytes), draw(_bytes), draw(_bytes))
    g.add_edges_from((f"v{a}", f"v{b}") for a, b in edges)
    return g


@st.composite
def chains(draw: Any, max_nodes: int = 9) -> nx.DiGraph:
    n = draw(st.integers(1, max_nodes))
    return draw(_costed([(i, i + 1) for i in range(n - 1)], n))


@st.composite
def diamonds(draw: Any, max_nodes: int = 9) -> nx.DiGraph:
    """A source fanning out to parallel chains that join again (residual-like)."""
    width = draw(st.integers(1, 3))
    depth = draw(st.integers(1, max(1, (max_nodes - 2) // width)))
    edges, n = [], 1
    ends = []
    for _ in range(width):
        prev = 0
        for _ in range(depth):
            edges.append((prev, n))
            prev, n = n, n + 1
        ends.append(prev)
    edges += [(e, n) for e in ends]
    return draw(_costed(edges, n + 1))


@st.composite
def layered_dags(draw: Any, max_nodes: int = 9) -> nx.DiGraph:
    n = draw(st.integers(2, max_nodes))
    edges = []
    for b in range(1, n):
        parents = draw(st.sets(st.integers(0, b - 1), min_size=0, max_size=min(3, b)))
        edges += [(a, b) for a in sorted(parents)]
    return draw(_costed(edges, n))


@st.composite
def transformer_blocks(draw: Any, max_blocks: int = 3) -> nx.DiGraph:
    """Blocks of (param -> matmul -> act -> matmul) + residual add, with random costs."""
    blocks = draw(st.integers(1, max_blocks))
    edges, n, prev = [], 1, 0
    for _ in range(blocks):
        w, mm, act, mm2, add = n, n + 1, n + 2, n + 3, n + 4
        edges += [(w, mm), (prev, mm), (mm, act), (act, mm2), (mm2, add), (prev, add)]
        n, prev = n + 5, add
    g = draw(_costed(edges, n))
    return g


def cost_graphs(max_nodes: int = 9) -> st.SearchStrategy[nx.DiGraph]:
    return st.one_of(
        chains(max_nodes), diamonds(max_nodes), layered_dags(max_nodes), transformer_blocks(2)
    )


@st.composite
def device_lists(draw: Any, max_devices: int = 3, memory: bool = True) -> list[DeviceSpec]:
    k = draw(st.integers(1, max_devices))
    specs = []
    for j in range(k):
        speed = draw(st.sampled_from([1.0, 1.0, 2.0, 0.5]))
        mem = draw(st.one_of(st.none(), st.integers(0, 400))) if memory else None
        specs.append(DeviceSpec(f"d{j}", mem, speed))
    return specs


def transformer_graph(
    layers: int = 12,
    hidden: int = 768,
    seq: int = 128,
    vocab: int = 50257,
    rate: float = 1e13,
    lm_head: bool = True,
) -> nx.DiGraph:
    """An operator-level GPT-2-like CostGraph; time = FLOPs / ``rate``, fp32 tensors."""
    g = nx.DiGraph()
    act = seq * hidden * 4

    def op(name: str, flops: float, out: int, *inputs: str) -> str:
        _node(g, name, flops / rate, 0, out, out)
        g.add_edges_from((i, name) for i in inputs)
        return name

    def param(name: str, numel: int) -> str:
        _node(g, name, 0.0, numel * 4, numel * 4, 0)
        return name

    ids = op("input_ids", 0, seq * 8)
    wte = param("wte", vocab * hidden)
    h = op("embed", seq * hidden, act, ids, wte)
    h = op("add_pos", seq * hidden, act, h, param("wpe", 1024 * hidden))
    for i in range(layers):
        b = f"h{i}_"
        ln = op(b + "ln1", 8 * seq * hidden, act, h, param(b + "ln1_w", 2 * hidden))
        qkv = op(b + "c_attn", 2 * seq * hidden * 3 * hidden, 3 * act, ln)
        g.add_edge(param(b + "c_attn_w", 3 * hidden * hidden), qkv)
        q, k, v = (op(b + x, 0, act, qkv) for x in ("q", "k", "v"))
        s = op(b + "scores", 2 * seq * seq * hidden, 12 * seq * seq * 4, q, k)
        p = op(b + "softmax", 5 * 12 * seq * seq, 12 * seq * seq * 4, s)
        c = op(b + "ctx", 2 * seq * seq * hidden, act, p, v)
        c = op(b + "merge", 0, act, c)
        o = op(b + "c_proj", 2 * seq * hidden * hidden, act, c)
        g.add_edge(param(b + "c_proj_w", hidden * hidden), o)
        h = op(b + "add1", seq * hidden, act, h, o)
        ln = op(b + "ln2", 8 * seq * hidden, act, h, param(b + "ln2_w", 2 * hidden))
        f = op(b + "c_fc", 2 * seq * hidden * 4 * hidden, 4 * act, ln)
        g.add_edge(param(b + "c_fc_w", 4 * hidden * hidden), f)
        f = op(b + "gelu", 8 * seq * 4 * hidden, 4 * act, f)
        f = op(b + "mlp_proj", 2 * seq * hidden * 4 * hidden, act, f)
        g.add_edge(param(b + "mlp_proj_w", 4 * hidden * hidden), f)
        h = op(b + "add2", seq * hidden, act, h, f)
    h = op("ln_f", 8 * seq * hidden, act, h, param("ln_f_w", 2 * hidden))
    if lm_head:
        op("lm_head", 2 * seq * hidden * vocab, seq * vocab * 4, h, wte)
    g.graph.update(model="SyntheticGPT", cost="flops", inputs=[ids], outputs=[])
    return g
