"""Property-based tests of the planner (hypothesis): validity, bounds, optimality, determinism.

The profile registered in conftest.py ("ci" or "dev") sets the number of examples;
graphs stay at <= 9 nodes and <= 3 stages so a brute force can check optimality.
"""

from __future__ import annotations

import importlib
import math
from unittest import mock

import networkx as nx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import cost_graphs, device_lists

from partitioner import InfeasiblePlanError, evaluate
from partitioner.planner.baselines import POLICIES, baseline
from partitioner.planner.coarsen import coarsen, uncoarsen
from partitioner.planner.cost import DeviceSpec
from partitioner.planner.heuristics import topo_order
from partitioner.planner.solver import solve

GAP = 0.01
solve_module = importlib.import_module("partitioner.planner.solver")
BW = st.sampled_from([1.0, 4.0, 100.0])
SLOW = settings(suppress_health_check=[HealthCheck.too_slow])


def brute_force(
    graph: nx.DiGraph, specs: list[DeviceSpec], bw: float
) -> tuple[float, dict[str, int]] | None:
    """The least bottleneck over every valid assignment (None: none fits memory)."""
    best: tuple[float, dict[str, int]] | None = None
    for stage in _assignments(graph, len(specs)):
        ev = evaluate(graph, stage, specs, bw)
        if ev.valid and (best is None or ev.bottleneck < best[0]):
            best = (ev.bottleneck, stage)
    return best


def _solve(graph: nx.DiGraph, specs: list[DeviceSpec], bw: float, **kw: object):  # type: ignore[no-untyped-def]
    return solve(graph, specs, bandwidth=bw, time_limit=5.0, gap=GAP, **kw)  # type: ignore[arg-type]


@SLOW
@given(cost_graphs(), device_lists(), BW)
def test_plan_is_valid_and_equals_evaluate(
    graph: nx.DiGraph, specs: list[DeviceSpec], bw: float
) -> None:
    try:
        plan = _solve(graph, specs, bw)
    except InfeasiblePlanError:
        assume(False)
        return
    ev = evaluate(graph, plan.assignment, plan.device_specs, plan.bandwidth)
    assert ev.valid, ev.violations
    assert plan.bottleneck == ev.bottleneck
    assert plan.comm_bytes == ev.comm_bytes
    assert [s.cost for s in plan.stages] == [s.cost for s in ev.stages]
    assert plan.lower_bound <= plan.bottleneck


@SLOW
@given(cost_graphs(), device_lists(), BW)
def test_matches_brute_force_and_bound_is_valid(
    graph: nx.DiGraph, specs: list[DeviceSpec], bw: float
) -> None:
    truth = brute_force(graph, specs, bw)
    if truth is None:
        with pytest.raises(InfeasiblePlanError):
            _solve(graph, specs, bw)
        return
    plan = _solve(graph, specs, bw)
    opt = truth[0]
    tol = 1e-9 * max(opt, 1e-30)
    assert plan.lower_bound <= opt + tol, "the lower bound must hold for the fine problem"
    assert plan.bottleneck >= opt - tol
    if plan.status == "optimal":
        assert plan.gap <= GAP + 1e-12
        assert plan.bottleneck <= opt / (1 - GAP) + tol


@SLOW
@given(cost_graphs(), device_lists(memory=False), BW)
def test_never_worse_than_a_feasible_baseline(
    graph: nx.DiGraph, specs: list[DeviceSpec], bw: float
) -> None:
    plan = _solve(graph, specs, bw)
    for policy in POLICIES:
        base = baseline(graph, specs, policy, bandwidth=bw)
        assert plan.bottleneck <= base.bottleneck * (1 + 1e-12)
        assert base.lower_bound <= base.bottleneck


@SLOW
@given(cost_graphs(), device_lists(), BW)
def test_identical_input_gives_identical_plan(
    graph: nx.DiGraph, specs: list[DeviceSpec], bw: float
) -> None:
    try:
        first = _solve(graph, specs, bw)
    except InfeasiblePlanError:
        return
    again = _solve(nx.DiGraph(graph), list(specs), bw)
    assert again.assignment == first.assignment
    assert (again.bottleneck, again.comm_bytes, again.status) == (
        first.bottleneck,
        first.comm_bytes,
        first.status,
    )


@SLOW
@given(cost_graphs(), device_lists(memory=False), BW, st.sampled_from([0.05, 0.25, 1.0]))
def test_coarsen_solve_uncoarsen_is_valid(
    graph: nx.DiGraph, specs: list[DeviceSpec], bw: float, fraction: float
) -> None:
    c = coarsen(graph, len(specs), fraction=fraction)
    assert nx.is_directed_acyclic_graph(c.graph)
    assert sorted(v for vs in c.members.values() for v in vs) == sorted(graph.nodes)
    coarse = _solve(c.graph, specs, bw)
    fine = uncoarsen(coarse.assignment, c)
    ev = evaluate(graph, fine, coarse.device_specs, bw)
    assert ev.valid, ev.violations
    assert math.isclose(
        sum(s.time for s in ev.stages), sum(t for _, t in graph.nodes(data="time"))
    )


@SLOW
@given(cost_graphs(), device_lists(), BW)
def test_coarse_path_keeps_a_valid_bound(
    graph: nx.DiGraph, specs: list[DeviceSpec], bw: float
) -> None:
    # force the large-graph path (coarse ILP, then the proving fine ILP) on small graphs
    truth = brute_force(graph, specs, bw)
    with mock.patch.object(solve_module, "FINE_LIMIT", 0):
        if truth is None:
            with pytest.raises(InfeasiblePlanError):
                _solve(graph, specs, bw)
            return
        plan = _solve(graph, specs, bw)
    opt = truth[0]
    tol = 1e-9 * max(opt, 1e-30)
    assert evaluate(graph, plan.assignment, plan.device_specs, plan.bandwidth).valid
    assert plan.lower_bound <= opt + tol
    assert plan.bottleneck >= opt - tol
    if plan.status == "optimal":
        assert plan.bottleneck <= opt / (1 - GAP) + tol


@st.composite
def graphs_with_views(draw: st.DrawFn) -> nx.DiGraph:
    """A cost graph whose nodes sometimes hand their output on through free "views": a
    node of time 0 and no memory reading one producer (with an output no bigger, it is a
    ``getitem`` of a tuple), that some of the producer's consumers read instead."""
    g: nx.DiGraph = draw(cost_graphs(max_nodes=7))
    for u in list(g.nodes):
        if not draw(st.booleans()):
            continue
        view = f"{u}_item"
        out = draw(st.integers(0, 2 * int(g.nodes[u]["out_bytes"]) + 8))  # some are bigger
        g.add_node(view, time=0.0, param_bytes=0, out_bytes=out, act_bytes=0)
        for w in list(g.successors(u)):
            if w != view and draw(st.booleans()):
                g.remove_edge(u, w)
                g.add_edge(view, w)
        g.add_edge(u, view)
    return g


@SLOW
@given(graphs_with_views(), device_lists(), BW)
def test_exact_reduction_keeps_the_optimum(
    graph: nx.DiGraph, specs: list[DeviceSpec], bw: float
) -> None:
    """The merges of `reduce_exact` (views join their producer) never lose the optimum."""
    from partitioner.planner.coarsen import reduce_exact

    assume(graph.number_of_nodes() <= 10)
    limited = any(s.memory is not None for s in specs)
    reduced = reduce_exact(graph, limited)
    fine = brute_force(graph, specs, bw)
    # every assignment of the groups, each scored exactly on the fine graph (the ILP reads
    # the groups' exact tensors, not the coarse graph's summed bytes)
    best = None
    for coarse in _assignments(reduced.graph, len(specs)):
        ev = evaluate(graph, uncoarsen(coarse, reduced), specs, bw)
        if ev.valid and (best is None or ev.bottleneck < best):
            best = ev.bottleneck
    assert (fine is None) == (best is None)
    if fine is not None and best is not None:
        assert best <= fine[0] * (1 + 1e-9) + 1e-12


def _assignments(graph: nx.DiGraph, stages: int) -> list[dict[str, int]]:
    """Every assignment of ``graph``'s nodes to stages that no edge goes back on."""
    order = topo_order(graph)
    found: list[dict[str, int]] = []
    stage: dict[str, int] = {}

    def walk(i: int) -> None:
        if i == len(order):
            found.append(dict(stage))
            return
        v = order[i]
        for k in range(max((stage[u] for u in graph.predecessors(v)), default=0), stages):
            stage[v] = k
            walk(i + 1)
        del stage[v]

    walk(0)
    return found
