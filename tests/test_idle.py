"""A stage with no compute is not a stage ([Note: idle stages] in `partitioner.planner.idle`)."""

from __future__ import annotations

from typing import Any

import networkx as nx
from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner.planner.cost import DeviceSpec, evaluate
from partitioner.planner.idle import drop_idle_stages
from tests.strategies import cost_graphs


def _chain(times: list[float]) -> nx.DiGraph:
    g = nx.DiGraph()
    for i, t in enumerate(times):
        g.add_node(f"v{i}", time=t, param_bytes=0, out_bytes=8, act_bytes=0)
    g.add_edges_from((f"v{i}", f"v{i + 1}") for i in range(len(times) - 1))
    return g


def test_stages_holding_only_inputs_and_items_join_their_neighbour() -> None:
    g = _chain([0.0, 0.0, 1.0, 1.0])  # a placeholder, a getitem, then two layers
    devices = [DeviceSpec(f"d{k}") for k in range(4)]
    planned = {"v0": 0, "v1": 1, "v2": 2, "v3": 3}
    got = drop_idle_stages(g, planned, devices, 1e9)
    assert got == {"v0": 2, "v1": 2, "v2": 2, "v3": 3}
    assert (
        evaluate(g, got, devices, 1e9).comm_bytes < evaluate(g, planned, devices, 1e9).comm_bytes
    )


def test_an_idle_stage_stays_when_moving_it_breaks_a_memory_limit() -> None:
    g = _chain([0.0, 1.0])
    g.nodes["v0"]["param_bytes"] = 100
    devices = [DeviceSpec("d0", memory=100), DeviceSpec("d1", memory=50)]
    assert drop_idle_stages(g, {"v0": 0, "v1": 1}, devices, 1e9) == {"v0": 0, "v1": 1}


@st.composite
def _planned(draw: Any) -> tuple[nx.DiGraph, dict[str, int], list[DeviceSpec]]:
    g = draw(cost_graphs())
    order = list(nx.topological_sort(g))
    k = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, len(order)), min_size=k - 1, max_size=k - 1)))
    bounds = [0, *cuts, len(order)]
    assignment = {v: s for s in range(k) for v in order[bounds[s] : bounds[s + 1]]}
    return g, assignment, [DeviceSpec(f"d{s}") for s in range(k)]


@settings(max_examples=200, deadline=None)
@given(_planned(), st.sampled_from([1.0, 10.0, 1e9]))
def test_dropping_idle_stages_never_makes_a_plan_worse(case: Any, bandwidth: float) -> None:
    g, assignment, devices = case
    before = evaluate(g, assignment, devices, bandwidth)
    got = drop_idle_stages(g, assignment, devices, bandwidth)
    after = evaluate(g, got, devices, bandwidth)
    assert after.valid
    assert after.bottleneck <= before.bottleneck * (1 + 1e-9)
    assert after.comm_bytes <= before.comm_bytes
    assert set(got.values()) <= set(assignment.values())
