"""The compute-only greedy fill of `heuristics.split_by_time`, on prefix sums.

Filling stages in topological order, each as far as its time stays under a cap, is a walk
over nodes in Python; `split_by_time` bisects the cap 60 times, which on a 4,232-node graph
took a second of a 2 s time limit. Without communication the stage a node lands in depends
only on prefix sums of time and memory, so each stage's end is one binary search.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence

from partitioner.planner.cost import DeviceSpec

__all__ = ["greedy_by_time"]


def greedy_by_time(
    time: Sequence[float], mem: Sequence[int], specs: Sequence[DeviceSpec], cap: float
) -> list[int] | None:
    """Stage of each node when stage k takes nodes while their time / speed stays <= cap and
    their memory within its limit, the rest going on; None when the last stage overflows.
    The same assignment as `heuristics._greedy` without communication."""
    n = len(time)
    t_sum = [0.0, *itertools.accumulate(time)]
    m_sum = [0, *itertools.accumulate(mem)]
    stage = [0] * n
    start = 0
    for k, spec in enumerate(specs):
        limit = math.inf if spec.memory is None else float(spec.memory)
        # the largest end with t_sum[end] - t_sum[start] <= cap * speed (and memory)
        end = bisect.bisect_right(t_sum, t_sum[start] + cap * spec.speed, lo=start) - 1
        end = min(end, bisect.bisect_right(m_sum, m_sum[start] + limit, lo=start) - 1)
        end = max(end, start)
        stage[start:end] = [k] * (end - start)
        start = end
        if start == n:
            return stage
    return None
