"""Plan: figures equal evaluate, JSON round trip, and validation on load."""

from __future__ import annotations

import json
import os
import re

import networkx as nx
import pytest

from partitioner import DeviceSpec, Plan, PlanError, evaluate
from partitioner.planner.plan import SCHEMA, make_plan
from partitioner.planner.planfile import MAX_FILE_BYTES


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


# -- plan files: PlanError, and only PlanError, naming the field and the fix ---------------

#: A plan file as the first version of `Plan.save` (commit 1d09933) wrote it.
OLD_PLAN = """{
  "schema": "modelsplit.plan/1", "model": "MyModel", "objective": "throughput",
  "status": "optimal", "solver": "highs", "solve_time": 0.0,
  "bottleneck": 6.000000005333334, "comm_bytes": 64, "lower_bound": 1.5,
  "gap": 0.7500000002222222, "bandwidth": 12000000000.0, "chunks": 4, "signature": [],
  "devices": [{"name": "cuda:0", "memory": 16000000000, "speed": 2.0},
              {"name": "cuda:1", "memory": null, "speed": 1.0}],
  "stages": [
    {"device": "cuda:0", "nodes": 2, "time": 2.0, "in_bytes": 0, "cost": 1.0,
     "param_bytes": 1000, "act_bytes": 16, "first": "n0", "last": "n1"},
    {"device": "cuda:1", "nodes": 2, "time": 6.0, "in_bytes": 64, "cost": 6.000000005333334,
     "param_bytes": 5000, "act_bytes": 16, "first": "n2", "last": "n3"}],
  "assignment": {"n0": 0, "n1": 0, "n2": 1, "n3": 1},
  "meta": {"ilp": "fine 0.01s"}
}
"""


def saved(**kw) -> dict:
    """The dict of a valid two-stage plan, with a signature and notes."""
    g = chain()
    a = {v: (0 if int(v[1:]) < 3 else 1) for v in g}
    specs = [DeviceSpec("cuda:0", memory=10**9, speed=2.0), DeviceSpec("cuda:1")]
    signature = [
        {"path": "args[0]", "shape": [8, 64], "dtype": "float32"},
        {"path": "kwargs['flag']", "value": "True"},
    ]
    plan = make_plan(
        g, a, specs, lower_bound=1.0, status="optimal", solver="h", signature=signature, **kw
    )
    return plan.to_dict()


def load_text(tmp_path, text: str | bytes) -> Plan:
    path = tmp_path / "plan.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return Plan.load(path)


def refused(tmp_path, text: str | bytes) -> str:
    """The message of the PlanError that loading ``text`` raises (one line, with a fix)."""
    with pytest.raises(PlanError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    assert "`modelsplit plan`" in message, message
    return message


def test_an_old_plan_file_still_loads(tmp_path) -> None:
    plan = load_text(tmp_path, OLD_PLAN)
    assert plan.to_dict() == json.loads(OLD_PLAN)
    assert plan.devices == ["cuda:0", "cuda:1"] and plan.chunks == 4
    assert plan.device_specs[0] == DeviceSpec("cuda:0", memory=16 * 10**9, speed=2.0)


def test_round_trip_keeps_types(tmp_path) -> None:
    data = saved(bandwidth=[[0.0, 5e9], [6e9, 0.0]])
    plan = load_text(tmp_path, json.dumps(data))
    assert plan.to_dict() == data
    assert type(plan.comm_bytes) is int and type(plan.stages[1].in_bytes) is int
    assert plan.bandwidth == [[0.0, 5e9], [6e9, 0.0]]
    again = Plan.from_dict(data)
    again.meta["x"] = 1
    assert "x" not in data["meta"]  # a copy, not the caller's dict


@pytest.mark.parametrize(
    ("mutate", "field", "hint"),
    [
        (lambda d: d["devices"][0].update(name=None), "devices[0].name", "non-empty string"),
        (lambda d: d.update(comm_bytes=1.5), "comm_bytes", "whole number"),
        (lambda d: d.update(chunks=True), "chunks", "wrong type (true)"),
        (lambda d: d["stages"][0].update(nodes=False), "stages[0].nodes", "wrong type"),
        (lambda d: d["devices"][1].update(name="cuda:0"), "devices[1].name", "repeats"),
        (lambda d: d["stages"][1].update(device="cuda:7"), "stages[1].device", "devices[1]"),
        (lambda d: d["stages"][0].update(time=-1.0), "stages[0].time", ">= 0"),
        (lambda d: d.update(lower_bound=-2), "lower_bound", ">= 0"),
        (lambda d: d["devices"][0].update(speed=0), "devices[0].speed", "> 0"),
        (lambda d: d["devices"][0].update(memory=-5), "devices[0].memory", ">= 0"),
        (lambda d: d.update(gap=1.5), "gap", "<= 1"),
        (lambda d: d.pop("chunks"), "chunks", "is missing"),
        (lambda d: d["stages"][1].pop("in_bytes"), "stages[1].in_bytes", "is missing"),
        (lambda d: d["devices"][0].pop("speed"), "devices[0].speed", "is missing"),
        (lambda d: d["stages"][0].update(colour="red"), "stages[0].colour", "remove it"),
        (lambda d: d.update(model=None), "model", "wrong type"),
        (lambda d: d.update(objective="fastest"), "objective", '"balanced-cut"'),
        (lambda d: d.update(chunks=0), "chunks", ">= 1"),
        (lambda d: d["assignment"].update(n1=0.5), 'assignment["n1"]', "whole number"),
        (lambda d: d["assignment"].update(n1="0"), 'assignment["n1"]', "wrong type"),
        (lambda d: d.update(assignment={v: 0 for v in d["assignment"]}), "assignment", "stage 1"),
        (lambda d: d.update(stages=[]), "stages", "at least 1"),
        (lambda d: d.update(bandwidth="fast"), "bandwidth", "wrong type"),
        (lambda d: d.update(bandwidth=[[1.0, 2.0]]), "bandwidth", "2 x 2"),
        (lambda d: d.update(bandwidth=[[0, 1], [0, 0]]), "bandwidth[1][0]", "> 0"),
        (lambda d: d["signature"][0].update(shape=[8, -1]), "signature[0].shape[1]", ">= 0"),
        (lambda d: d["signature"].append({"path": "x"}), "signature[2]", "a tensor"),
        (lambda d: d["signature"][1].update(value=3), "signature[1].value", "string"),
        (lambda d: d.update(meta=[]), "meta", "wrong type"),
        (lambda d: d.update(signature={}), "signature", "wrong type"),
    ],
)
def test_plan_load_names_the_field_and_the_fix(tmp_path, mutate, field, hint) -> None:
    data = saved()
    mutate(data)
    message = refused(tmp_path, json.dumps(data))
    assert f"plan field {field!r}" in message and hint in message


@pytest.mark.parametrize(
    ("old", "new", "field", "hint"),
    [
        (r'"bottleneck": [\d.]+', '"bottleneck": NaN', "bottleneck", "NaN"),
        (r'"gap": [\d.]+', '"gap": Infinity', "gap", "Infinity"),
        ('"solve_time": 0.0', '"solve_time": -Infinity', "solve_time", "-Infinity"),
        ('"time": 6.0', '"time": 1e999', "stages[0].time", "1e999"),
        ('"comm_bytes": 10', '"comm_bytes": 1' + "0" * 30, "comm_bytes", "31 digits"),
        ('"comm_bytes": 10', '"comm_bytes": 1' + "0" * 5000, "comm_bytes", "5001 digits"),
        ('"ilp": "t"', '"ilp": NaN', 'meta["ilp"]', "finite number"),
        ('"nodes": 3,', '"nodes": 3, "nodes": 1,', "stages[0]", 'names "nodes" twice'),
        ('"n0": 0,', '"n0": 0, "n0": 1,', "assignment", 'names "n0" twice'),
        ('"ilp": "t"', '"ilp": ' + "[" * 40 + "]" * 40, 'meta["ilp"]', "deeper than the 32"),
        ('"model": ""', '"model": "\\ud800"', "model", "lone surrogate"),
    ],
)
def test_plan_load_refuses_what_json_readers_disagree_on(tmp_path, old, new, field, hint) -> None:
    text = Plan.from_dict(saved(meta={"ilp": "t"})).to_json()
    bad = re.sub(old, lambda _: new, text, count=1)
    assert bad != text, old
    message = refused(tmp_path, bad)
    assert f"plan field '{field}" in message and hint in message


def test_plan_load_refuses_bad_text(tmp_path) -> None:
    text = Plan.from_dict(saved()).to_json()
    assert 'the plan names "model" twice' in refused(tmp_path, '{"model": "", ' + text[1:])
    deep = text.replace('"meta": {', '"meta": {"x": ' + "[" * 100_000 + "]" * 100_000 + ",")
    assert "deeper than the 32 levels" in refused(tmp_path, deep)
    latin = text.replace('"solver": "h"', '"solver": "h\u00e9"').encode("latin-1")
    assert "not UTF-8 text (byte 0xe9" in refused(tmp_path, latin)
    assert "not valid JSON (line 1, column 1" in refused(tmp_path, "")
    assert "not valid JSON" in refused(tmp_path, text[: len(text) // 2])
    assert "must be a JSON object, not a list" in refused(tmp_path, "[]")
    assert load_text(tmp_path, "\ufeff" + text).to_dict() == json.loads(text)  # a BOM is fine


def test_plan_load_reads_whole_numbers_written_as_floats(tmp_path) -> None:
    data = saved()
    data["comm_bytes"], data["stages"][1]["in_bytes"], data["chunks"] = 10.0, 10.0, 4.0
    plan = load_text(tmp_path, json.dumps(data))
    assert plan.comm_bytes == 10 and type(plan.comm_bytes) is int and plan.chunks == 4


def test_plan_from_dict_raises_plan_error_only() -> None:
    for bad in (None, [], "plan", 3, {"schema": SCHEMA}):
        with pytest.raises(PlanError):
            Plan.from_dict(bad)  # type: ignore[arg-type]
    data = saved()
    data["meta"] = {"handle": object()}
    with pytest.raises(PlanError, match=r"'meta\[\"handle\"\]' has the wrong type \(a Python"):
        Plan.from_dict(data)
    data = saved()
    data["stages"][0]["time"] = float("nan")
    with pytest.raises(PlanError, match=r"'stages\[0\].time' is NaN"):
        Plan.from_dict(data)
    data = saved()
    data["comm_bytes"] = 10**400
    with pytest.raises(PlanError, match="'comm_bytes' is an integer of"):
        Plan.from_dict(data)
    data = saved()
    data["devices"] = tuple(data["devices"])  # a tuple is a list, as json.dumps writes it
    assert Plan.from_dict(data).to_dict() == saved()


def test_plan_load_refuses_special_and_huge_files(tmp_path) -> None:
    with pytest.raises(PlanError, match="is a directory, not a regular file"):
        Plan.load(tmp_path)
    if os.path.exists("/dev/zero"):
        with pytest.raises(PlanError, match="is a character device, not a regular file"):
            Plan.load("/dev/zero")
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written, and nothing read
    with pytest.raises(PlanError, match="64.0 MiB, over the 64 MiB a plan file may hold"):
        Plan.load(huge)
    with pytest.raises(PlanError, match="embedded null byte"):
        Plan.load("plan\0.json")
    with pytest.raises(PlanError, match="must be a str or os.PathLike, not int"):
        Plan.load(3)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.timeout(20)
def test_plan_load_refuses_a_fifo_without_waiting(tmp_path) -> None:
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)
    with pytest.raises(PlanError, match="is a FIFO"):
        Plan.load(fifo)  # opening it would wait for a writer forever


def test_docs_list_every_field_of_the_schema() -> None:
    from pathlib import Path

    from partitioner.planner.schema import PLAN

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    section = doc.split("## Plan file: `modelsplit.plan/1`")[1].split("\n## ")[0]
    listed = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert listed == list(PLAN.fields)
