"""A stage that computes nothing is not a stage: its nodes join a neighbour.

[Note: idle stages]
Inputs, weights and tuple items cost no time (`partitioner.profiling.costgraph`), so a
solver that is indifferent between plans of equal bottleneck may leave a stage holding only
such nodes: a device used for nothing, and a boundary more for its values to cross. After
solving, every stage whose forward and backward time are both 0 gives its nodes to the stage
before it (or, for the first stage, the one after it) when that keeps the plan valid and its
bottleneck and bytes no worse, judged by `evaluate`. Moving a whole stage onto a neighbour
never sends an edge backwards: its nodes' producers are in earlier stages or in it, and their
readers in later stages or in it. The emptied stage is dropped when the plan is made
(`make_plan`), and the other stages keep their devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx

from partitioner.planner.cost import Bandwidth, DeviceSpec, evaluate

__all__ = ["drop_idle_stages"]


def drop_idle_stages(
    graph: nx.DiGraph,
    assignment: Mapping[str, int],
    devices: Sequence[DeviceSpec],
    bandwidth: Bandwidth,
) -> dict[str, int]:
    """``assignment`` with every idle stage's nodes moved onto a neighbour where that is
    no worse ([Note: idle stages]); the stage numbers of the others are kept."""
    current = dict(assignment)
    before = evaluate(graph, current, devices, bandwidth)
    for k in sorted(_idle(graph, current), reverse=True):
        for target in _neighbours(current, k):
            moved = {v: target if s == k else s for v, s in current.items()}
            after = evaluate(graph, moved, devices, bandwidth)
            no_worse = (
                after.bottleneck <= before.bottleneck * (1 + 1e-12)
                and after.comm_bytes <= before.comm_bytes
            )
            if after.valid and no_worse:
                current, before = moved, after
                break
    return current


def _idle(graph: nx.DiGraph, assignment: Mapping[str, int]) -> list[int]:
    work: dict[int, float] = {}
    for v, k in assignment.items():
        data = graph.nodes[v]
        work[k] = work.get(k, 0.0) + float(data["time"]) + float(data.get("bwd_time", 0.0))
    return [k for k, w in work.items() if w == 0.0]


def _neighbours(assignment: Mapping[str, int], k: int) -> list[int]:
    """The used stages next to ``k``: the one before it first, then the one after it."""
    used = sorted(set(assignment.values()))
    i = used.index(k)
    return [used[j] for j in (i - 1, i + 1) if 0 <= j < len(used)]
