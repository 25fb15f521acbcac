"""greedy_by_time (prefix sums) against the node-by-node fill it replaces."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner import DeviceSpec
from partitioner.planner.prefix import greedy_by_time


def _walk(
    time: list[float], mem: list[int], specs: list[DeviceSpec], cap: float
) -> list[int] | None:
    """heuristics._greedy without communication, as it was written: node by node."""
    stage, k, load, used = [0] * len(time), 0, 0.0, 0
    for j in range(len(time)):
        while True:
            limit = math.inf if specs[k].memory is None else specs[k].memory
            if (load + time[j]) / specs[k].speed <= cap and used + mem[j] <= limit:
                break
            if k == len(specs) - 1:
                return None
            k, load, used = k + 1, 0.0, 0
        stage[j], load, used = k, load + time[j], used + mem[j]
    return stage


@settings(max_examples=300, deadline=None)
@given(
    time=st.lists(st.integers(0, 20).map(float), min_size=1, max_size=40),
    devices=st.lists(
        st.tuples(st.sampled_from([1.0, 1.5, 2.0]), st.one_of(st.none(), st.integers(0, 60))),
        min_size=1,
        max_size=5,
    ),
    cap=st.integers(0, 60).map(float),
    data=st.data(),
)
def test_greedy_by_time_is_the_node_by_node_fill(
    time: list[float], devices: list[tuple[float, int | None]], cap: float, data: st.DataObject
) -> None:
    mem = data.draw(st.lists(st.integers(0, 15), min_size=len(time), max_size=len(time)))
    specs = [DeviceSpec(f"d{i}", speed=s, memory=m) for i, (s, m) in enumerate(devices)]
    assert greedy_by_time(time, mem, specs, cap) == _walk(time, mem, specs, cap)
