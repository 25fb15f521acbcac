"""What `solve` works on between its phases: a level (groups + ILP input) and incumbents."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx

from partitioner.errors import InfeasiblePlanError
from partitioner.planner import bounds
from partitioner.planner.baselines import POLICIES, baseline_stages
from partitioner.planner.coarsen import Coarsening
from partitioner.planner.cost import Bandwidth, DeviceSpec, fmt_bytes
from partitioner.planner.formulation import IlpInput
from partitioner.planner.heuristics import (
    Indexed,
    contiguous_split,
    fits_memory,
    greedy_split,
    index_graph,
    refine,
    sources_late,
    split_by_time,
    stage_costs,
)

__all__ = [
    "Level",
    "best_of",
    "check_memory",
    "floors_until",
    "incumbent",
    "level_of",
    "memory_message",
    "score",
]

#: contiguous_split is O(stages * groups^2): use it while that stays under this
DP_LIMIT = 1_500_000
#: seconds `solve` keeps, out of its time limit, for what follows its last ILP (the best
#: plan, its figures): a few hundredths on the benchmark's 2606-node graph
FINISH_RESERVE = 0.1


@dataclass
class Level:
    """A coarsening seen by the ILP: groups 0..n-1 in topological order."""

    coarsening: Coarsening
    inp: IlpInput
    group: list[int]  # fine node index -> group index
    dp: list[int] | None = None  # the contiguous split of the groups, once computed

    @property
    def n(self) -> int:
        return len(self.inp.time)

    def with_floors(self, floors: Sequence[float]) -> IlpInput:
        """The ILP input with each group's receive floor (the largest of its nodes')."""
        out = [0.0] * self.n
        for i, c in enumerate(self.group):
            out[c] = max(out[c], floors[i])
        inp = self.inp
        return IlpInput(inp.time, inp.mem, inp.edges, inp.tensors, out)

    def fine(self, stage: Sequence[int]) -> list[int]:
        return [stage[c] for c in self.group]

    def start(self, fine: Sequence[int]) -> list[int] | None:
        """Group stages of a fine assignment that keeps every group whole, else the DP's."""
        out: list[int | None] = [None] * self.n
        for i, c in enumerate(self.group):
            if out[c] is None:
                out[c] = fine[i]
            elif out[c] != fine[i]:
                return self.dp
        return [0 if s is None else s for s in out]


def level_of(coarsening: Coarsening, g: Indexed) -> Level:
    cg = coarsening.graph
    names = index_graph(cg).names
    at = {c: i for i, c in enumerate(names)}
    owner = coarsening.owner
    inp = IlpInput(
        time=[float(cg.nodes[c]["time"]) for c in names],
        mem=[int(cg.nodes[c]["param_bytes"]) + int(cg.nodes[c]["act_bytes"]) for c in names],
        edges=sorted((at[a], at[b]) for a, b in cg.edges),
        tensors=[
            (at[t.src], t.out_bytes, sorted(at[d] for d in t.dsts)) for t in coarsening.tensors
        ],
    )
    return Level(coarsening, inp, [at[owner[v]] for v in g.names])


def score(
    g: Indexed, stage: Sequence[int], specs: Sequence[DeviceSpec], bw: Bandwidth
) -> tuple[float, float, tuple[int, ...]]:
    """Sort key of a fine assignment: bottleneck, then comm seconds, then the stages."""
    costs, comm = stage_costs(g, stage, specs, bw)
    return (max(costs), comm, tuple(stage))


def best_of(
    g: Indexed,
    cands: Sequence[list[int]],
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
    polish: bool = False,
) -> list[int]:
    if polish:  # the two best only: local moves cost more than scoring
        cands = sorted(cands, key=lambda s: score(g, s, specs, bw))[:2]
        cands = [refine(g, s, specs, bw) for s in cands]
    return min(cands, key=lambda s: score(g, s, specs, bw))


def incumbent(
    level: Level,
    g: Indexed,
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
    graph: nx.DiGraph | None = None,
) -> list[int] | None:
    """The best heuristic assignment of the fine graph, or None if none fits memory.

    With ``graph``, the baselines are candidates too, so a plan is never worse
    than a baseline that fits.
    """
    cands = []
    late = index_graph(graph, sources_late(graph)) if graph is not None else g
    at = {v: i for i, v in enumerate(late.names)}
    for policy in POLICIES if graph is not None else ():
        try:
            in_late = baseline_stages(graph, late, specs, policy)  # type: ignore[arg-type]
        except InfeasiblePlanError:
            continue
        found = [in_late[at[v]] for v in g.names]
        if fits_memory(g, found, specs):
            cands.append(found)
    if len(specs) * level.n**2 <= DP_LIMIT:
        inp = level.inp
        level.dp = contiguous_split(inp.time, inp.mem, inp.tensors, specs, bw)
        if level.dp is not None:
            cands.append(level.fine(level.dp))
    for more in (greedy_split(g, specs, bw), split_by_time(g, specs)):
        if more is not None:
            cands.append(more)
    if not cands:
        return None
    return best_of(g, cands, specs, bw, polish=True)


def floors_until(
    g: Indexed, specs: Sequence[DeviceSpec], upper: float, deadline: float
) -> list[float]:
    """`bounds.receive_floors`, stopping at ``deadline`` (perf_counter seconds), or as soon
    as its pace shows it would not finish by then.

    The nodes not reached keep floor 0, which promises nothing and so stays valid; but the
    comm bound takes the least floor of the deep nodes, so floors cut short lose it, and a
    run that cannot finish stops early to leave its time to the ILP. The work is one search
    per deep node (0.7 s on the benchmark's 2606-node graph). Equal to
    `bounds.receive_floors` when it finishes.
    """
    budget = upper * max(s.speed for s in specs)
    deep = bounds._longest_into(g)
    todo = [w for w in range(g.n) if deep[w] > budget and g.time[w] > 0]
    floors = [0.0] * g.n
    start = time.perf_counter()
    for i, w in enumerate(todo):
        now = time.perf_counter()
        pace = (now - start) / i if i >= 50 else 0.0  # seconds per node, once it means much
        if now + 0.8 * pace * (len(todo) - i) > deadline:
            break
        frontier, window = bounds._window(g, w, budget)
        if frontier:
            floors[w] = bounds._widest(g, frontier, window, w)
    return floors


def memory_message(graph: nx.DiGraph, specs: Sequence[DeviceSpec], why: str) -> str:
    """Why the model cannot fit, in units a person reads, and what to change."""
    need = {v: int(d["param_bytes"]) + int(d["act_bytes"]) for v, d in graph.nodes(data=True)}
    big = max(need, key=lambda v: (need[v], str(v)))
    limits = [s.memory for s in specs]
    offer = "unlimited" if None in limits else fmt_bytes(sum(m for m in limits if m is not None))
    largest = "unlimited" if None in limits else fmt_bytes(max(m for m in limits if m is not None))
    if why == "largest node":
        fix = f"give one device at least {fmt_bytes(need[big])}"
    else:
        fix = f"raise the memory limits (at least {fmt_bytes(sum(need.values()))} in all)"
    return (
        f"the model does not fit the devices ({why}): it needs {fmt_bytes(sum(need.values()))} "
        f"in all and {fmt_bytes(need[big])} for its largest node {big!r}, the devices offer "
        f"{offer} in all and {largest} at most on one device: {fix}, or add devices"
    )


def check_memory(graph: nx.DiGraph, specs: Sequence[DeviceSpec]) -> None:
    """Raise InfeasiblePlanError when a node or the whole model cannot fit (fast checks)."""
    limits = [s.memory for s in specs]
    if None in limits:
        return
    need = [int(d["param_bytes"]) + int(d["act_bytes"]) for _, d in graph.nodes(data=True)]
    caps = [m for m in limits if m is not None]
    if sum(need) > sum(caps):
        raise InfeasiblePlanError(memory_message(graph, specs, "total memory"))
    if max(need) > max(caps):
        raise InfeasiblePlanError(memory_message(graph, specs, "largest node"))
