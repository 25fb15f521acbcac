"""Plan: figures equal evaluate, JSON round trip, and validation on load."""

from __future__ import annotations

import json

import networkx as nx
import pytest

from partitioner import DeviceSpec, Plan, PlanError, evaluate
from partitioner.planner.plan import SCHEMA, make_plan


def chain(n: int = 6) -> nx.DiGraph:
    g = nx.DiGraph()
    for k in range(n):
        g.add_node(f"n{k}", time=1.0 + k, param_bytes=100 * k, out_bytes=10, act_bytes=5)
        if k:
            g.add_edge(f"n{k - 1}", f"n{k}")
    return g


def test_make_plan_figures_equal_evaluate() -> None:
    g = chain()
    a = {"n0": 0, "n1": 0, "n2": 1, "n3": 1, "n4": 2, "n5": 2}
    plan = make_plan(g, a, 3, bandwidth=100.0, lower_bound=0.0, status="feasible", solver="t")
    ev = evaluate(g, plan.assignment, plan.device_specs, plan.bandwidth)
    assert plan.bottleneck == ev.bottleneck
    assert plan.comm_bytes == ev.comm_bytes == 20
    assert [s.cost for s in plan.stages] == [s.cost for s in ev.stages]
    assert plan.stages[1].first == "n2" and plan.stages[1].last == "n3"


def test_make_plan_drops_empty_stages_keeping_order() -> None:
    g = chain(4)
    a = {"n0": 0, "n1": 0, "n2": 2, "n3": 3}
    plan = make_plan(g, a, 4, lower_bound=0.0, status="feasible", solver="t")
    assert plan.num_stages == 3
    assert plan.devices == ["dev:0", "dev:2", "dev:3"]
    assert sorted(set(plan.assignment.values())) == [0, 1, 2]


def test_make_plan_rejects_invalid_assignment() -> None:
    g = chain(3)
    with pytest.raises(PlanError, match="goes back"):
        make_plan(g, {"n0": 1, "n1": 0, "n2": 1}, 2, lower_bound=0, status="feasible", solver="t")
    specs = [DeviceSpec("a", memory=10), DeviceSpec("b", memory=10)]
    with pytest.raises(PlanError, match="limit 10"):
        make_plan(g, {"n0": 0, "n1": 0, "n2": 1}, specs, lower_bound=0, status="x", solver="t")


def test_plan_json_round_trip(tmp_path) -> None:
    g = chain()
    a = {v: (0 if int(v[1:]) < 3 else 1) for v in g}
    specs = [DeviceSpec("cuda:0", memory=10**9, speed=2.0), DeviceSpec("cuda:1")]
    plan = make_plan(g, a, specs, lower_bound=1.0, status="optimal", solver="highs", chunks=4)
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA
    loaded = Plan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    assert loaded.device_specs == specs


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema="other/9"), "unknown plan schema"),
        (lambda d: d.pop("assignment"), "'assignment' is missing"),
        (lambda d: d.update(bottleneck="fast"), "'bottleneck' has the wrong type"),
        (lambda d: d["assignment"].update(n0=7), "outside 0..1"),
        (lambda d: d.update(status="great"), "'status'"),
        (lambda d: d["devices"].pop(), "2 stages for 1 devices"),
    ],
)
def test_plan_load_rejects_corrupt_fields(tmp_path, mutate, message) -> None:
    g = chain()
    a = {v: (0 if int(v[1:]) < 3 else 1) for v in g}
    data = make_plan(g, a, 2, lower_bound=1.0, status="optimal", solver="h").to_dict()
    mutate(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_plan_load_not_json(tmp_path) -> None:
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)
    with pytest.raises(PlanError, match="cannot read"):
        Plan.load(tmp_path / "missing.json")


def test_validate_against_model_nodes() -> None:
    g = chain()
    a = {v: (0 if int(v[1:]) < 3 else 1) for v in g}
    plan = make_plan(g, a, 2, lower_bound=1.0, status="optimal", solver="h")
    plan.validate(g.nodes, g)
    with pytest.raises(PlanError, match="does not have"):
        plan.validate(["n0", "n1"])
    with pytest.raises(PlanError, match="does not place"):
        plan.validate([*g.nodes, "extra"])
    backwards = nx.DiGraph(g)
    backwards.add_edge("n5", "n0")
    with pytest.raises(PlanError, match="backwards"):
        plan.validate(backwards.nodes, backwards)
