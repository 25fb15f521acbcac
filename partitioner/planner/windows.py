"""Stage windows: the stages a group can take in any plan at least as good as a known one."""

from __future__ import annotations

import math
from collections.abc import Sequence

from partitioner.planner.cost import Bandwidth, DeviceSpec, in_bandwidth
from partitioner.planner.formulation import IlpInput

__all__ = ["WINDOW_LIMIT", "stage_windows"]

#: stage windows use an n x n ancestor matrix: skipped above this many groups
WINDOW_LIMIT = 8000


def stage_windows(
    inp: IlpInput, specs: Sequence[DeviceSpec], upper: float | None, bw: Bandwidth = 1.0
) -> tuple[list[int], list[int]]:
    """Earliest and latest stage of each group in any assignment with bottleneck <= upper.

    A group and its ancestors fill stages 0..stage(i); with every stage k holding
    at most ``upper * speed_k`` of time, stage(i) >= the first k whose cumulative
    capacity covers the ancestors' time; symmetrically with descendants for the
    latest stage. With receive floors (``inp.floor``, valid for ``upper``) a
    stage's time capacity shrinks by what it must receive: the group's own stage
    by its floor, each later stage holding a descendant by the least floor of the
    descendants (all deep, see [Note: comm bound]). Fixing x outside these windows
    removes the fractional "every node a little in every stage" points that make
    the plain LP bound weak.
    """
    import numpy as np

    n, K = len(inp.time), len(specs)
    if upper is None or n == 0 or n > WINDOW_LIMIT:
        return [0] * n, [K - 1] * n
    t = np.asarray(inp.time, dtype=np.float64)
    preds: list[list[int]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    for a, b in inp.edges:
        preds[b].append(a)
        succs[a].append(b)
    anc = np.zeros((n, n), dtype=bool)
    for v in range(n):  # groups are indexed in topological order
        if preds[v]:
            anc[v] = np.logical_or.reduce(anc[preds[v]], axis=0)
            anc[v, preds[v]] = True
    up = anc @ t + t
    down = anc.T @ t + t
    cap = upper * (1 + 1e-9)
    link = max(in_bandwidth(bw, k, K) for k in range(K))
    own, later = _receive_times(inp, succs, link)
    speeds = [s.speed for s in specs]
    lo, hi = [], []
    for i in range(n):
        room = [max(0.0, cap - own[i]) * s for s in speeds]
        k, acc = 0, 0.0  # earliest: stages before k at full capacity, k less its floor
        while k < K - 1 and acc + room[k] < up[i] - 1e-12 * cap:
            acc += cap * speeds[k]
            k += 1
        lo.append(k)
        k, acc = K - 1, 0.0  # latest: later stages less the descendants' least floor
        while k > lo[i] and acc + room[k] < down[i] - 1e-12 * cap:
            acc += max(0.0, cap - later[i]) * speeds[k]
            k -= 1
        hi.append(k)
    return lo, hi


def _receive_times(
    inp: IlpInput, succs: list[list[int]], link: float
) -> tuple[list[float], list[float]]:
    """Seconds each group's stage must receive, and the least over its descendants."""
    n = len(inp.time)
    if inp.floor is None:
        return [0.0] * n, [0.0] * n
    own = [f / link if t > 0 else 0.0 for f, t in zip(inp.floor, inp.time, strict=True)]
    later = [math.inf] * n
    for v in range(n - 1, -1, -1):
        for w in succs[v]:
            if inp.time[w] > 0:
                later[v] = min(later[v], own[w])
            later[v] = min(later[v], later[w])
    return own, [0.0 if math.isinf(x) else x for x in later]
