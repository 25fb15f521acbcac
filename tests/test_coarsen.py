"""Coarsening: a DAG of groups covering every node, cheap cuts kept, a map back."""

from __future__ import annotations

import networkx as nx
from strategies import transformer_graph

from partitioner import evaluate
from partitioner.planner.coarsen import coarsen, identity, reduce_exact, uncoarsen
from partitioner.planner.cost import NODE_ATTRS


def _check(g: nx.DiGraph, c: object) -> None:
    from partitioner.planner.coarsen import Coarsening

    assert isinstance(c, Coarsening)
    assert nx.is_directed_acyclic_graph(c.graph)
    members = sorted(v for vs in c.members.values() for v in vs)
    assert members == sorted(g.nodes)
    for attr in ("time", "param_bytes", "act_bytes"):
        assert sum(d[attr] for _, d in c.graph.nodes(data=True)) == sum(
            d[attr] for _, d in g.nodes(data=True)
        )
    owner = c.owner
    for u, v in g.edges:  # every fine edge is inside a group or along a coarse edge
        assert owner[u] == owner[v] or c.graph.has_edge(owner[u], owner[v])


def test_transformer_coarsens_to_a_dag_with_every_node() -> None:
    g = transformer_graph(6)
    c = coarsen(g, 4)
    _check(g, c)
    assert c.graph.number_of_nodes() < g.number_of_nodes() / 3


def test_parameters_join_their_consumer() -> None:
    g = transformer_graph(2)
    c = coarsen(g, 2, fraction=0.01)
    owner = c.owner
    assert owner["h0_c_attn_w"] == owner["h0_c_attn"]
    assert owner["wte"] != owner["lm_head"] or owner["wte"] == owner["embed"]  # tied: 2 users


def test_residual_cut_stays_available() -> None:
    # the cheapest cut of a block is after its residual add: add and next LayerNorm stay apart
    g = transformer_graph(4)
    c = coarsen(g, 8, fraction=0.05)
    owner = c.owner
    assert owner["h1_add2"] != owner["h2_ln1"]


def test_uncoarsen_gives_each_node_its_group_stage() -> None:
    g = transformer_graph(2)
    c = coarsen(g, 2)
    order = list(nx.topological_sort(c.graph))
    half = len(order) // 2
    coarse = {v: int(i >= half) for i, v in enumerate(order)}
    fine = uncoarsen(coarse, c)
    assert set(fine) == set(g.nodes)
    assert evaluate(g, fine, 2).valid


def test_coarse_figures_bound_the_fine_ones() -> None:
    # a group's out_bytes sums what it exports: never less than the fine comm
    g = transformer_graph(3)
    c = coarsen(g, 3)
    order = list(nx.topological_sort(c.graph))
    coarse = {v: min(3 * i // len(order), 2) for i, v in enumerate(order)}
    ev_c = evaluate(c.graph, coarse, 3)
    ev_f = evaluate(g, uncoarsen(coarse, c), 3)
    assert ev_c.comm_bytes >= ev_f.comm_bytes
    assert ev_c.bottleneck >= ev_f.bottleneck


def test_identity_and_exact_reduction() -> None:
    g = transformer_graph(2)
    ident = identity(g)
    _check(g, ident)
    assert ident.graph.number_of_nodes() == g.number_of_nodes()
    exact = reduce_exact(g, memory_limited=False)
    _check(g, exact)
    sources = [v for v in g.nodes if g.in_degree(v) == 0 and g.out_degree(v) == 1]
    assert exact.graph.number_of_nodes() == g.number_of_nodes() - len(sources)
    # with memory limits, parameters (which hold memory) stay where they are
    assert reduce_exact(g, memory_limited=True).graph.number_of_nodes() == g.number_of_nodes()


def test_tensors_keep_exact_communication() -> None:
    g = transformer_graph(2)
    c = coarsen(g, 2)
    owner = c.owner
    for t in c.tensors:
        assert t.src not in t.dsts
        assert all(d in c.members for d in t.dsts)
    exported = {u for u in g.nodes if any(owner[w] != owner[u] for w in g.successors(u))}
    assert len(c.tensors) == len(exported)


def test_coarse_graph_is_a_costgraph() -> None:
    g = transformer_graph(1)
    c = coarsen(g, 2)
    for _, d in c.graph.nodes(data=True):
        assert all(a in d for a in NODE_ATTRS)


def test_a_view_beside_readers_of_the_whole_output_is_not_merged() -> None:
    # v0's output goes to v1 and v2 and, through a smaller view, to v3: with v1 and v3 on one
    # stage, the view there is free (v0's output arrives anyway), while merged into v0 its
    # output would travel too. Found by test_exact_reduction_keeps_the_optimum.
    g = nx.DiGraph()
    for name, time, out in [("v0", 1.0, 24), ("v1", 2.0, 57), ("v2", 3.0, 26), ("v3", 0.0, 26)]:
        g.add_node(name, time=time, param_bytes=0, out_bytes=out, act_bytes=0)
    g.add_node("v0_item", time=0.0, param_bytes=0, out_bytes=17, act_bytes=0)
    g.add_edges_from([("v0", "v1"), ("v0", "v2"), ("v0", "v0_item"), ("v0_item", "v3")])
    reduced = reduce_exact(g, False)
    assert reduced.members["v0"] == ["v0"] and reduced.members["v0_item"] == ["v0_item"]
    # all of a tuple's readers are views adding up to no more than it: they join it
    t = nx.DiGraph()
    t.add_node("split", time=1.0, param_bytes=0, out_bytes=16, act_bytes=0)
    for k in range(2):
        t.add_node(f"item{k}", time=0.0, param_bytes=0, out_bytes=8, act_bytes=0)
        t.add_node(f"use{k}", time=1.0, param_bytes=0, out_bytes=8, act_bytes=0)
        t.add_edges_from([("split", f"item{k}"), (f"item{k}", f"use{k}")])
    assert sorted(reduce_exact(t, False).members["split"]) == ["item0", "item1", "split"]
