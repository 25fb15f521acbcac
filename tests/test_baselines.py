"""Baselines: each a valid Plan under the same cost model, with its known weaknesses."""

from __future__ import annotations

import itertools

import networkx as nx
import pytest
from strategies import transformer_graph

from partitioner import DeviceSpec, InfeasiblePlanError, evaluate
from partitioner.planner.baselines import POLICIES, baseline
from partitioner.planner.solver import solve


def layered(blocks: int = 4, lm_head: float = 1.0) -> nx.DiGraph:
    """embed -> blocks (2 nodes each, module paths h.i) -> head."""
    g = nx.DiGraph()
    names = []

    def add(name: str, time: float, params: int, module: str) -> None:
        g.add_node(
            name,
            time=time,
            param_bytes=params,
            out_bytes=8,
            act_bytes=0,
            module=module,
            order=len(names),
        )
        if names:
            g.add_edge(names[-1], name)
        names.append(name)

    add("embed", 1.0, 1000, "embed")
    for i in range(blocks):
        add(f"h{i}_a", 1.0, 100, f"model.h.{i}.attn")
        add(f"h{i}_b", 1.0, 100, f"model.h.{i}.mlp")
    add("head", lm_head, 1000, "lm_head")
    return g


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_a_valid_plan(policy: str) -> None:
    g = layered()
    plan = baseline(g, 3, policy, bandwidth=100.0)
    assert plan.status == "baseline"
    assert plan.solver == f"baseline:{policy}"
    ev = evaluate(g, plan.assignment, plan.device_specs, plan.bandwidth)
    assert ev.valid
    assert plan.bottleneck == ev.bottleneck
    assert plan.lower_bound <= plan.bottleneck


def test_uniform_counts_layers_by_module_path() -> None:
    g = layered(blocks=4)
    plan = baseline(g, 3, "uniform")
    # units: embed, h.0 .. h.3, lm_head = 6 layers -> 2 per stage
    assert [s.nodes for s in plan.stages] == [3, 4, 3]


def test_parameters_balances_parameter_bytes() -> None:
    g = layered(blocks=4)
    plan = baseline(g, 2, "parameters")
    params = [s.param_bytes for s in plan.stages]
    assert max(params) <= 1400


def test_greedy_memory_fills_the_first_device_first() -> None:
    g = layered(blocks=4)
    assert baseline(g, 3, "greedy-memory").num_stages == 1
    specs = [DeviceSpec("a", 1300), DeviceSpec("b", 1300), DeviceSpec("c", 5000)]
    plan = baseline(g, specs, "greedy-memory")
    assert [s.param_bytes for s in plan.stages] == [1300, 500, 1000]
    with pytest.raises(InfeasiblePlanError):
        baseline(g, [DeviceSpec("a", 1000), DeviceSpec("b", 1000)], "greedy-memory")


def test_time_dp_is_the_best_contiguous_split_by_time() -> None:
    times = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    g = nx.DiGraph()
    for i, t in enumerate(times):
        g.add_node(f"n{i}", time=t, param_bytes=0, out_bytes=0, act_bytes=0, order=i)
        if i:
            g.add_edge(f"n{i - 1}", f"n{i}")
    best = min(
        max(sum(times[a:b]) for a, b in zip((0, *cuts), (*cuts, len(times)), strict=True))
        for cuts in itertools.combinations(range(1, len(times)), 2)
    )
    plan = baseline(g, 3, "time-dp")
    assert plan.bottleneck == pytest.approx(best, rel=1e-6)


def test_layer_dp_balances_forward_plus_backward_over_whole_layers() -> None:
    # 5 layers of 2 nodes (module paths h.0 .. h.4); the backward makes layer 3 heavy
    bwd = {"h3_a": 6.0}
    g = nx.DiGraph()
    prev = None
    for i in range(5):
        for part in "ab":
            name = f"h{i}_{part}"
            g.add_node(
                name,
                time=1.0,
                bwd_time=bwd.get(name, 2.0),
                param_bytes=0,
                out_bytes=0,
                act_bytes=0,
                module=f"h.{i}.{part}",
                order=len(g),
            )
            if prev:
                g.add_edge(prev, name)
            prev = name
    layer = [6.0, 6.0, 6.0, 10.0, 6.0]  # forward + backward per layer
    best = min(
        max(sum(layer[a:b]) for a, b in zip((0, *cuts), (*cuts, 5), strict=True))
        for cuts in itertools.combinations(range(1, 5), 2)
    )
    plan = baseline(g, 3, "layer-dp")
    stage = plan.assignment
    # whole layers: both nodes of a layer share a stage
    assert all(stage[f"h{i}_a"] == stage[f"h{i}_b"] for i in range(5))
    per_stage = [0.0] * plan.num_stages
    for i in range(5):
        per_stage[stage[f"h{i}_a"]] += layer[i]
    assert max(per_stage) == pytest.approx(best)  # 16: layer 3's backward counts


def test_heavy_lm_head_unbalances_uniform_and_parameters() -> None:
    g = transformer_graph(4, hidden=256, seq=64, vocab=16000, rate=1e12)
    plan = solve(g, 4, bandwidth=12e9, time_limit=10)
    for policy in ("uniform", "parameters"):
        assert baseline(g, 4, policy, bandwidth=12e9).bottleneck > 1.3 * plan.bottleneck


def test_bad_policy_and_memory() -> None:
    with pytest.raises(ValueError, match="policy"):
        baseline(layered(), 2, "random")
    with pytest.raises(InfeasiblePlanError, match="uniform"):
        baseline(layered(), [DeviceSpec("a", 100), DeviceSpec("b", 100)], "uniform")
