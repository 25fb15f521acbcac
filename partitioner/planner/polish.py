"""Local moves on the simulated step: the last phase of a training solve.

The derived problem minimises the forward-and-backward bottleneck ([Note: training solve]),
a proxy: the step also depends on how forward and backward split within each stage, on
the schedule's order and on the transfers. So the best few candidates' splits are polished
on the step itself: a node moves to the stage before or after its own when no edge then
goes backwards and no stage is emptied, and a move is kept when the simulated step
shrinks and every device's peak still fits (first improvement, until no move helps or the
time is up). On random connected graphs of <= 7 nodes, 2-3 devices and 4 micro-batches it
took the plans that match a brute force's optimum from 78% to 88%, and their mean excess
step from 0.9% to 0.4% (docs/planner.md, "Training plans").

Before that, `seeded` gives each candidate the best of its own split and a few others scored
on the same simulated step: the baselines' (``uniform``, ``layer-dp``: layers balanced by
forward + backward) and the best contiguous split by forward time alone (``time-dp``, what an
inference plan balances). The proxy can miss what those find: under GPipe the step pays the
largest forward and the largest backward separately, so a split that balances forward + backward
can lose to one that balances forward (benchmarks/train_baselines.py showed the MLP's GPipe
plan 4% slower than the forward-only one before the seeds).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import networkx as nx

from partitioner.errors import InfeasiblePlanError
from partitioner.planner.baselines import baseline_stages
from partitioner.planner.cost import Bandwidth, DeviceSpec
from partitioner.planner.heuristics import index_graph, sources_late, topo_order
from partitioner.planner.stepcost import stage_specs
from partitioner.planner.trainplan import Scored, first_devices, rank, rescore, scored_split

__all__ = ["POLISHED", "SEEDS", "polish", "polish_best", "seeded"]

#: the other splits every candidate is scored with (`seeded`)
SEEDS = ("uniform", "layer-dp", "time-dp")

#: how many of the best candidates (distinct splits) are polished
POLISHED = 3


def polish_best(scored: Sequence[Scored], deadline: float) -> list[Scored]:
    """``scored`` with its `POLISHED` best fitting candidates polished, sharing the time
    until ``deadline`` (perf_counter seconds)."""
    fitting = sorted((s for s in scored if s.fits), key=rank)[:POLISHED]
    out = [s for s in scored if not any(s is f for f in fitting)]
    for i, s in enumerate(fitting):
        share = (deadline - time.perf_counter()) / (len(fitting) - i)
        out.append(polish(s, time.perf_counter() + share) if share > 0 else s)
    return out


def seeded(
    scored: Sequence[Scored],
    specs: Sequence[DeviceSpec],
    bandwidth: Bandwidth,
    deadline: float = math.inf,
) -> list[Scored]:
    """Each of ``scored`` replaced by the fastest fitting of its split and the `SEEDS`'
    splits on the devices its candidate was offered (see the module; ``specs`` and
    ``bandwidth`` are the solve's: a candidate on k devices was offered the first k).

    The candidates go best first, until ``deadline`` (perf_counter seconds); the rest keep
    their split. A seed's split depends only on the graph's nodes and the stage count (the
    micro-batch size scales every cost alike), so each is computed once per stage count.
    """
    splits: dict[tuple[int, int], list[dict[str, int]]] = {}
    out = list(scored)
    order = sorted(range(len(out)), key=lambda i: (not out[i].fits, rank(out[i])))
    for i in order:
        if time.perf_counter() >= deadline:
            break
        s = out[i]
        c = s.choice
        offered = list(specs[: c.devices or len(specs)])
        key = (len(offered), c.virtual_stages)
        if key not in splits:
            splits[key] = _seed_splits(s.graph, stage_specs(offered, c.virtual_stages))
        bw = first_devices(bandwidth, len(offered))
        best = s
        for assignment in splits[key]:
            other = scored_split(s.graph, c, s.sub, assignment, offered, bw)
            if other is not None and other.fits and (not best.fits or rank(other) < rank(best)):
                best = other
        out[i] = best
    return out


def _seed_splits(graph: nx.DiGraph, stages: Sequence[DeviceSpec]) -> list[dict[str, int]]:
    """The `SEEDS`' splits of ``graph`` onto ``stages`` that use every stage."""
    g = index_graph(graph, sources_late(graph))
    found = []
    for policy in SEEDS:
        try:
            stage = baseline_stages(graph, g, stages, policy)
        except InfeasiblePlanError:
            continue
        if len(set(stage)) == len(stages):  # every device used, no stage left empty
            found.append(dict(zip(g.names, stage, strict=True)))
    return found


def polish(s: Scored, deadline: float) -> Scored:
    """``s`` after the single-node moves that shorten its simulated step (see the module)."""
    graph = s.graph
    stages = len(s.figures.forward.stages)
    order = topo_order(graph)
    a = dict(s.assignment)
    size = [0] * stages
    for k in a.values():
        size[k] += 1
    best, moved = s, True
    while moved and time.perf_counter() < deadline:
        moved = False
        for v in order:
            k = a[v]
            for t in (k - 1, k + 1):
                if not 0 <= t < stages or size[k] == 1 or not _can_move(graph, a, v, t):
                    continue
                a[v] = t
                found = rescore(best, a)
                if found is not None and found.fits and found.step_time < best.step_time:
                    best, moved = found, True
                    size[k], size[t] = size[k] - 1, size[t] + 1
                    break
                a[v] = k
            if time.perf_counter() >= deadline:
                break
    return best


def _can_move(graph: nx.DiGraph, a: dict[str, int], v: str, t: int) -> bool:
    """Whether node v may go to stage t (next to its own) with no edge going backwards."""
    if t > a[v]:
        return all(a[w] >= t for w in graph.successors(v))
    return all(a[u] <= t for u in graph.predecessors(v))
