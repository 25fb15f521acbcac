"""Fuzzing plan files: a mutated file loads as exactly what it says, or raises PlanError.

Each example starts from a valid saved plan (an inference plan, `modelsplit.plan/1`, or a
training plan, `/2`) and mutates it: a key deleted, added or named
twice, a value of another type, NaN or Infinity, a deep nest, a truncated text, random
bytes. Loading must then give a plan whose every figure, name and type is what the file
says, or raise PlanError with one line naming a fix; never any other exception, and never
a silent coercion (null read as "None", 1.5 as 1, true as 1). Mutations that always break
a plan (NaN, a repeated key, a cut text, bytes that are not UTF-8...) must be refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import networkx as nx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from partitioner import DeviceSpec, Plan, PlanError
from partitioner.planner.plan import make_plan

#: Examples per test: ten times the profile's (300 in CI's `ci` profile, 600 in `dev`).
EXAMPLES = 10 * settings().max_examples
FUZZ = settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])


def _base() -> dict[str, Any]:
    g = nx.DiGraph()
    for k in range(6):
        g.add_node(f"n{k}", time=0.5 + k, param_bytes=100 * k, out_bytes=8 * k, act_bytes=4)
        if k:
            g.add_edge(f"n{k - 1}", f"n{k}")
    devices = [DeviceSpec("cuda:0", memory=10**9, speed=2.0), DeviceSpec("cuda:1"), "cuda:2"]
    plan = make_plan(
        g,
        {"n0": 0, "n1": 0, "n2": 1, "n3": 1, "n4": 2, "n5": 2},
        devices,
        bandwidth=[[0.0, 1e9, 2e9], [1e9, 0.0, 3e9], [2e9, 3e9, 0.0]],
        lower_bound=1.0,
        status="optimal",
        solver="highs",
        chunks=6,
        model="Net",
        signature=[
            {"path": "args[0]", "shape": [12, 4], "dtype": "float32"},
            {"path": "kwargs['mode']", "value": "'fast'"},
        ],
        meta={"ilp": "fine 0.01s", "tries": [1, 2.5, None, True, {"deep": ["x"]}]},
    )
    return plan.to_dict()


def _training() -> dict[str, Any]:
    """A training plan (modelsplit.plan/2): every field it adds away from its default."""
    from partitioner.planner.solver import solve

    g = nx.DiGraph()
    for k in range(8):
        g.add_node(f"b{k}", time=1.0 + k % 3, bwd_time=2.0, param_bytes=100, out_bytes=5,
                   act_bytes=150, order=k)  # fmt: skip
        if k:
            g.add_edge(f"b{k - 1}", f"b{k}")
    devices = [DeviceSpec("cpu:0", memory=2000, speed=2.0), DeviceSpec("cpu:1", memory=2000)]
    plan = solve(
        g, devices, training=True, schedule="interleaved-1f1b", virtual_stages=2, chunks=4,
        checkpoint=True, bandwidth=[[0.0, 1e9], [2e9, 0.0]], time_limit=5, model="Blocks",
    )  # fmt: skip
    assert plan.notes and plan.peak_memory and plan.step_time
    return plan.to_dict()


BASE = _base()
#: an inference plan (modelsplit.plan/1) and a training plan (modelsplit.plan/2)
BASES = (BASE, _training())


class Raw(str):
    """Text written into the JSON as it is (NaN, a deep nest, a lone surrogate escape)."""


class Pairs(list):  # type: ignore[type-arg]
    """An object written from (key, value) pairs, so that a key may appear twice."""


def dump(value: Any) -> str:
    """JSON text of ``value``, with `Raw` text and `Pairs` objects as they are."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return dump(Pairs(value.items()))
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path of every value inside ``value``, containers included."""
    found = [prefix] if prefix else []
    if isinstance(value, dict | list):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            found.extend(paths(item, (*prefix, key)))
    return found


def get(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def put(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``doc`` with the value at ``path`` replaced (the new document when path is empty)."""
    if not path:
        return value
    get(doc, path[:-1])[path[-1]] = value
    return doc


TOKENS = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 25)
PLAIN = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -1, 1.5, 3.0, 2**63, "", "None", "0", "cuda:0", "n0", "optimal"]),
    st.text(max_size=8),
    st.sampled_from([[], {}, [0], [[1e9]], {"name": "cuda:0"}]),
)
ODD = st.one_of(
    PLAIN,
    st.just(Raw('"\\ud800"')),  # a lone surrogate
    st.integers(1, 3000).map(lambda n: Raw("[" * n + "]" * n)),  # past 1000: RecursionError
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bool]:
    """The JSON text of a mutated plan, and whether the mutation must be refused."""
    doc = json.loads(json.dumps(draw(st.sampled_from(BASES))))
    kind = draw(st.sampled_from(["delete", "replace", "token", "nest", "twice", "add"]))
    if kind in ("twice", "add"):  # a key written twice, or a key no plan has
        objects = [p for p in [(), *paths(doc)] if isinstance(get(doc, p), dict) and get(doc, p)]
        where = draw(st.sampled_from(objects))
        obj = get(doc, where)
        name = draw(st.sampled_from(sorted(obj))) if kind == "twice" else "extra"
        pairs = Pairs(obj.items())
        pairs.insert(draw(st.integers(0, len(pairs))), (name, draw(ODD)))
        free = where[:1] in (("meta",), ("assignment",))  # keys of the writer's choosing
        return dump(put(doc, where, pairs)), kind == "twice" or not free
    path = draw(st.sampled_from(paths(doc)))
    if kind == "delete":
        del get(doc, path[:-1])[path[-1]]
        free = path[0] in ("meta", "assignment")
        return dump(doc), isinstance(path[-1], str) and not free
    if kind == "replace":
        return dump(put(doc, path, draw(ODD))), False
    if kind == "token":  # NaN, Infinity, a number no float or int64 holds
        return dump(put(doc, path, Raw(draw(st.sampled_from(TOKENS))))), True
    return dump(put(doc, path, Raw("[" * 40 + "]" * 40))), True  # deeper than a plan may be


def canon(value: Any) -> Any:
    """A value where true differs from 1, and 1 from "1" (but 1 equals 1.0, as in JSON)."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, dict):
        return {k: canon(v) for k, v in value.items()}
    return [canon(v) for v in value]


def check_load(tmp_path: Path, data: bytes, must_fail: bool) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(data)
    try:
        plan = Plan.load(path)
    except PlanError as e:
        message = str(e)
        assert "\n" not in message and "`modelsplit plan`" in message, message
        event("refused")
        return
    event("loaded")
    assert not must_fail, data[:300]
    said = json.loads(data.decode("utf-8-sig"))  # a file it accepts is plain JSON
    assert canon(plan.to_dict()) == canon(said)
    assert all(math.isfinite(s.cost) for s in plan.stages)


@FUZZ
@given(mutated())
def test_mutated_plan_files_load_as_written_or_raise_plan_error(tmp_path_factory, case) -> None:
    text, must_fail = case
    check_load(tmp_path_factory.mktemp("fuzz"), text.encode(), must_fail)


@FUZZ
@given(st.data())
def test_damaged_plan_text_raises_plan_error(tmp_path_factory, data) -> None:
    text = Plan.from_dict(data.draw(st.sampled_from(BASES))).to_json().encode()
    at = data.draw(st.integers(0, len(text) - 1))
    how = data.draw(st.sampled_from(["cut", "bytes", "latin-1", "bom", "splice"]))
    if how == "cut":  # any proper prefix of an object's text is not JSON
        damaged, must_fail = text[:at], True
    elif how == "bytes":
        noise = data.draw(st.binary(min_size=1, max_size=8))
        damaged, must_fail = text[:at] + noise + text[at:], b"\xff" in noise
    elif how == "latin-1":
        for name in (b'"Net"', b'"Blocks"'):
            text = text.replace(name, name[:2] + "\u00e9".encode("latin-1") + name[2:])
        damaged, must_fail = text, True
    elif how == "bom":
        damaged, must_fail = b"\xef\xbb\xbf" + text, False
    else:
        end = data.draw(st.integers(at, len(text)))
        damaged, must_fail = text[:at] + text[end:], False
    check_load(tmp_path_factory.mktemp("text"), damaged, must_fail)


@FUZZ
@given(st.data())
def test_from_dict_takes_plan_error_only(data) -> None:
    doc = json.loads(json.dumps(data.draw(st.sampled_from(BASES))))
    path = data.draw(st.sampled_from(paths(doc)))
    odd = st.one_of(
        PLAIN,
        st.sampled_from([float("nan"), float("inf"), 10**400, b"x", (1, 2), object(), {1: 2}]),
    )
    doc = put(doc, path, data.draw(odd))
    try:
        plan = Plan.from_dict(doc)
    except PlanError:
        return
    assert canon(plan.to_dict()) == canon(doc)
