"""The cost model (docs/planner.md): evaluate, lower_bound, devices, bytes, validation."""

from __future__ import annotations

import math

import networkx as nx
import pytest

from partitioner import DeviceSpec, evaluate
from partitioner.planner.cost import (
    check_bandwidth,
    lower_bound,
    normalize_devices,
    parse_bytes,
    validate_graph,
)


def diamond() -> nx.DiGraph:
    """a -> (b, c) -> d; a's output read by b and c, each 10 bytes."""
    g = nx.DiGraph()
    for name, t in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)):
        g.add_node(name, time=t, param_bytes=100, out_bytes=10, act_bytes=1)
    g.add_edges_from([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    return g


def test_a_tensor_is_received_once_per_stage() -> None:
    ev = evaluate(diamond(), {"a": 0, "b": 1, "c": 1, "d": 1}, 2, bandwidth=10.0)
    assert [s.in_bytes for s in ev.stages] == [0, 10]
    assert ev.comm_bytes == 10
    assert ev.stages[1].cost == pytest.approx(9.0 + 1.0)
    assert ev.bottleneck == pytest.approx(10.0)
    assert ev.valid


def test_tensors_may_skip_stages() -> None:
    ev = evaluate(diamond(), {"a": 0, "b": 1, "c": 0, "d": 2}, 3, bandwidth=10.0)
    assert [s.in_bytes for s in ev.stages] == [0, 10, 20]
    assert ev.valid


def test_speed_and_memory() -> None:
    specs = [DeviceSpec("x", memory=202, speed=2.0), DeviceSpec("y", memory=150)]
    ev = evaluate(diamond(), {"a": 0, "b": 0, "c": 1, "d": 1}, specs, bandwidth=10.0)
    assert ev.stages[0].cost == pytest.approx(1.5)
    assert ev.stages[0].memory == 202
    assert not ev.valid
    assert any("limit 150" in v for v in ev.violations)


def test_backward_edges_are_violations() -> None:
    ev = evaluate(diamond(), {"a": 1, "b": 0, "c": 1, "d": 1}, 2)
    assert not ev.valid
    assert "goes back" in ev.violations[0]


def test_bandwidth_matrix_is_per_link() -> None:
    bw = [[0.0, 10.0, 1.0], [10.0, 0.0, 5.0], [1.0, 5.0, 0.0]]
    ev = evaluate(diamond(), {"a": 0, "b": 1, "c": 1, "d": 2}, 3, bandwidth=bw)
    assert ev.stages[1].cost == pytest.approx(5.0 + 10 / 10.0)
    assert ev.stages[2].cost == pytest.approx(4.0 + 20 / 5.0)


def test_bad_assignments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="misses"):
        evaluate(diamond(), {"a": 0}, 2)
    with pytest.raises(ValueError, match="outside"):
        evaluate(diamond(), {"a": 0, "b": 0, "c": 0, "d": 5}, 2)


def test_lower_bound() -> None:
    g = diamond()
    assert lower_bound(g, 2) == pytest.approx(5.0)
    assert lower_bound(g, 4) == pytest.approx(4.0)  # the heaviest node
    assert lower_bound(g, [DeviceSpec("f", speed=4.0), DeviceSpec("s")]) == pytest.approx(2.0)


def test_devices_and_bytes() -> None:
    assert [d.name for d in normalize_devices(2)] == ["dev:0", "dev:1"]
    assert normalize_devices(["cuda:0"])[0].memory is None
    with pytest.raises(ValueError, match="positive integer"):
        normalize_devices(0)
    with pytest.raises(ValueError, match="speed"):
        DeviceSpec("x", speed=0)
    assert parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("1 GiB") == 2**30
    assert parse_bytes("25GB/s") == 25 * 10**9
    with pytest.raises(ValueError):
        parse_bytes("lots")
    check_bandwidth(1.0, 3)
    with pytest.raises(ValueError, match="3 x 3"):
        check_bandwidth([[1.0]], 3)
    with pytest.raises(ValueError, match="bandwidth"):
        check_bandwidth(-1.0, 2)


def test_validate_graph_names_the_problem() -> None:
    g = diamond()
    g.nodes["b"]["time"] = math.nan
    with pytest.raises(ValueError, match="'b'"):
        validate_graph(g)
    with pytest.raises(ValueError, match="no nodes"):
        validate_graph(nx.DiGraph())
