"""Fast heuristics: contiguous splits of a topological order, and local moves of nodes.

Both give the ILP its warm start and upper bound, and are the answer when no ILP
solution comes back. They work on `Indexed`, a graph flattened into arrays in
topological order, and apply the cost model of docs/planner.md exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

from partitioner.planner.cost import Bandwidth, DeviceSpec, bandwidth_between, in_bandwidth
from partitioner.planner.prefix import greedy_by_time

__all__ = [
    "Indexed",
    "contiguous_split",
    "fill_stages",
    "greedy_split",
    "fits_memory",
    "index_graph",
    "sources_late",
    "refine",
    "split_by_time",
    "stage_costs",
    "topo_order",
]

#: (producer group, bytes, consumer groups); groups are indices in topological order
TensorRow = tuple[int, int, list[int]]


def fill_stages(
    graph: nx.DiGraph, assignment: Mapping[str, int], stages: int
) -> dict[str, int] | None:
    """``assignment`` on exactly ``stages`` stages: its used stages renumbered in order, then
    the stage of most ``time`` among those of two nodes or more cut in two, where its time
    halves along `topo_order`, until there are ``stages``. None when there are fewer nodes.

    An interleaved schedule needs all K * V stages (stage s on device s % K); a throughput
    solve leaves stages empty when they would not lower its bottleneck (one node heavier than
    a fair share: an LM head). Cutting a stage along a topological order keeps every edge
    going forward, and never makes a stage's compute longer.
    """
    order = topo_order(graph)
    renumber = {k: i for i, k in enumerate(sorted(set(assignment.values())))}
    a = {v: renumber[k] for v, k in assignment.items()}
    count = len(renumber)
    work = {v: float(graph.nodes[v].get("time", 0.0)) for v in order}
    while count < stages:
        members: list[list[str]] = [[] for _ in range(count)]
        for v in order:
            members[a[v]].append(v)
        cands = [k for k in range(count) if len(members[k]) >= 2]
        if not cands:
            return None
        k = max(cands, key=lambda j: (sum(work[v] for v in members[j]), -j))
        nodes = members[k]
        half, acc, cut = sum(work[v] for v in nodes) / 2, 0.0, len(nodes) - 1
        for i, v in enumerate(nodes[:-1]):
            acc += work[v]
            if acc >= half:
                cut = i + 1
                break
        for v in a:
            if a[v] > k:
                a[v] += 1
        for v in nodes[cut:]:
            a[v] = k + 1
        count += 1
    return a


def topo_order(graph: nx.DiGraph) -> list[str]:
    """A deterministic topological order: the fx ``order`` attribute, then the name."""
    nodes = graph.nodes

    def key(v: str) -> tuple[int, str]:
        return (int(nodes[v].get("order", 0)), str(v))

    return list(nx.lexicographical_topological_sort(graph, key=key))


@dataclass
class Indexed:
    """A CostGraph as arrays: node i is ``names[i]``, i in topological order."""

    names: list[str]
    time: list[float]
    mem: list[int]
    out: list[int]
    preds: list[list[int]]
    succs: list[list[int]]

    @property
    def n(self) -> int:
        return len(self.names)


def sources_late(graph: nx.DiGraph) -> list[str]:
    """A topological order with each source (a parameter, an input) just before its first user.

    torch.export lists every parameter first; cut as it is, a contiguous split
    would put all weights on the first stage and all compute on the last.
    """
    order = topo_order(graph)
    pos = {v: i for i, v in enumerate(order)}
    late: dict[str, list[str]] = {}
    rest = []
    for v in order:
        users = [pos[w] for w in graph.successors(v)]
        if graph.in_degree(v) == 0 and users:
            late.setdefault(order[min(users)], []).append(v)
        else:
            rest.append(v)
    out: list[str] = []
    for v in rest:
        out.extend(late.get(v, ()))
        out.append(v)
    return out


def index_graph(graph: nx.DiGraph, order: Sequence[str] | None = None) -> Indexed:
    """Flatten ``graph`` in ``order`` (a topological order; default `topo_order`)."""
    names = list(order) if order is not None else topo_order(graph)
    pos = {v: i for i, v in enumerate(names)}
    nodes = graph.nodes
    return Indexed(
        names=names,
        time=[float(nodes[v]["time"]) for v in names],
        mem=[int(nodes[v]["param_bytes"]) + int(nodes[v]["act_bytes"]) for v in names],
        out=[int(nodes[v]["out_bytes"]) for v in names],
        preds=[sorted(pos[u] for u in graph.predecessors(v)) for v in names],
        succs=[sorted(pos[w] for w in graph.successors(v)) for v in names],
    )


def _limit(spec: DeviceSpec) -> float:
    return math.inf if spec.memory is None else float(spec.memory)


def _greedy(
    g: Indexed, specs: Sequence[DeviceSpec], bw: Bandwidth, cap: float, use_comm: bool
) -> list[int] | None:
    """Fill stages in order, each as far as its cost stays <= cap; None if it cannot."""
    if not use_comm:  # the same fill on prefix sums, one binary search per stage
        return greedy_by_time(g.time, g.mem, specs, cap)
    stage = [0] * g.n
    k, start, load, mem, comm = 0, 0, 0.0, 0, 0.0
    seen: set[int] = set()
    last = len(specs) - 1
    for j in range(g.n):
        while True:
            new = [p for p in g.preds[j] if p < start and p not in seen] if use_comm else []
            add_comm = sum(g.out[p] / bandwidth_between(bw, stage[p], k) for p in new)
            cost = (load + g.time[j]) / specs[k].speed + comm + add_comm
            if cost <= cap and mem + g.mem[j] <= _limit(specs[k]):
                break
            if k == last:
                return None
            k, start, load, mem, comm = k + 1, j, 0.0, 0, 0.0
            seen = set()
        stage[j] = k
        load += g.time[j]
        mem += g.mem[j]
        comm += add_comm
        seen.update(new)
    return stage


def _bisect(
    g: Indexed, specs: Sequence[DeviceSpec], bw: Bandwidth, use_comm: bool, iters: int = 30
) -> list[int] | None:
    best = _greedy(g, specs, bw, math.inf, use_comm)
    if best is None:
        return None
    hi = max(_State(g, best, specs, bw if use_comm else math.inf).costs())
    speed = max(s.speed for s in specs)
    lo = max(sum(g.time) / sum(s.speed for s in specs), max(g.time, default=0.0) / speed)
    for _ in range(iters):
        if hi - lo <= 1e-6 * max(hi, 1e-30):
            break
        mid = (lo + hi) / 2
        cand = _greedy(g, specs, bw, mid, use_comm)
        if cand is None:
            lo = mid
        else:
            best, hi = cand, mid
    return best


def greedy_split(g: Indexed, specs: Sequence[DeviceSpec], bw: Bandwidth) -> list[int] | None:
    """Contiguous split of the topological order, bisecting on the bottleneck (with comm)."""
    return _bisect(g, specs, bw, use_comm=True)


def split_by_time(g: Indexed, specs: Sequence[DeviceSpec]) -> list[int] | None:
    """Optimal contiguous split by compute time alone (torchgpipe's balance_by_time)."""
    return _bisect(g, specs, 1.0, use_comm=False, iters=60)


def _received(n: int, tensors: Sequence[TensorRow]) -> list[list[float]]:
    """recv[i][j - i]: bytes the segment i..j of the order reads from before i."""
    entering: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    for t, (src, nbytes, dsts) in enumerate(tensors):
        for d in dsts:
            entering[d].append((t, src, nbytes))
    table = []
    for i in range(n):
        row, acc, seen = [], 0.0, set()
        for j in range(i, n):
            for t, src, nbytes in entering[j]:
                if src < i and t not in seen:
                    seen.add(t)
                    acc += nbytes
            row.append(acc)
        table.append(row)
    return table


def contiguous_split(
    time: Sequence[float],
    mem: Sequence[int],
    tensors: Sequence[TensorRow],
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
) -> list[int] | None:
    """The best split of the order 0..n-1 into contiguous stages, by dynamic programming.

    Exact for a scalar bandwidth (O(K n^2)); with a matrix it charges every tensor
    at the fastest link into its stage, and the caller re-evaluates the result.
    """
    n, K = len(time), len(specs)
    recv = _received(n, tensors)
    pre_t, pre_m = [0.0], [0]
    for a, b in zip(time, mem, strict=True):
        pre_t.append(pre_t[-1] + a)
        pre_m.append(pre_m[-1] + b)
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(K)]
    back = [[-1] * (n + 1) for _ in range(K)]
    for k, spec in enumerate(specs):
        link, limit = in_bandwidth(bw, k, K), _limit(spec)
        best[k][0] = 0.0
        for j in range(1, n + 1):
            if k > 0 and best[k - 1][j] < best[k][j]:
                best[k][j], back[k][j] = best[k - 1][j], j  # stage k empty
            for i in range(j):
                prev = best[k - 1][i] if k else (0.0 if i == 0 else inf)
                if prev >= best[k][j] or pre_m[j] - pre_m[i] > limit:
                    continue
                cost = (pre_t[j] - pre_t[i]) / spec.speed + recv[i][j - 1 - i] / link
                value = max(prev, cost)
                if value < best[k][j]:
                    best[k][j], back[k][j] = value, i
    if best[K - 1][n] == inf:
        return None
    stage, j = [0] * n, n
    for k in range(K - 1, -1, -1):
        if j == 0:
            break
        i = back[k][j]
        for v in range(i, j):
            stage[v] = k
        j = i
    return stage


# -- local moves ---------------------------------------------------------------------------


class _State:
    """Per-stage time, memory and received bytes, updated node move by node move."""

    def __init__(
        self, g: Indexed, stage: list[int], specs: Sequence[DeviceSpec], bw: Bandwidth
    ) -> None:
        self.g, self.stage, self.specs, self.bw = g, list(stage), specs, bw
        k = len(specs)
        self.time = [0.0] * k
        self.mem = [0] * k
        self.comm = [0.0] * k
        self.cons: list[dict[int, int]] = [{} for _ in range(k)]
        for v in range(g.n):
            self.time[stage[v]] += g.time[v]
            self.mem[stage[v]] += g.mem[v]
            for w in g.succs[v]:
                c = self.cons[stage[w]]
                c[v] = c.get(v, 0) + 1
        for j in range(k):
            self.comm[j] = sum(self._bytes(u, j) for u in self.cons[j])

    def _bytes(self, u: int, j: int) -> float:
        su = self.stage[u]
        return 0.0 if su == j else self.g.out[u] / bandwidth_between(self.bw, su, j)

    def costs(self) -> list[float]:
        return [t / s.speed + c for t, s, c in zip(self.time, self.specs, self.comm, strict=True)]

    def fits(self, j: int) -> bool:
        return self.mem[j] <= _limit(self.specs[j])

    def move(self, v: int, dst: int) -> None:
        g, src = self.g, self.stage[v]
        for u in g.preds[v]:
            c = self.cons[src]
            c[u] -= 1
            if c[u] == 0:
                del c[u]
                self.comm[src] -= self._bytes(u, src)
            c = self.cons[dst]
            if u not in c:
                self.comm[dst] += self._bytes(u, dst)
            c[u] = c.get(u, 0) + 1
        users = [j for j in range(len(self.specs)) if v in self.cons[j]]
        for j in users:
            self.comm[j] -= self._bytes(v, j)
        self.stage[v] = dst
        for j in users:
            self.comm[j] += self._bytes(v, j)
        self.time[src] -= g.time[v]
        self.time[dst] += g.time[v]
        self.mem[src] -= g.mem[v]
        self.mem[dst] += g.mem[v]


def stage_costs(
    g: Indexed, stage: Sequence[int], specs: Sequence[DeviceSpec], bw: Bandwidth
) -> tuple[list[float], float]:
    """Each stage's cost C_k and the total comm seconds of a fine assignment."""
    st = _State(g, list(stage), specs, bw)
    return st.costs(), sum(st.comm)


def fits_memory(g: Indexed, stage: Sequence[int], specs: Sequence[DeviceSpec]) -> bool:
    used = [0] * len(specs)
    for v, k in enumerate(stage):
        used[k] += g.mem[v]
    return all(u <= _limit(s) for u, s in zip(used, specs, strict=True))


def _key(costs: list[float]) -> list[float]:
    return sorted(costs, reverse=True)


def _better(a: list[float], b: list[float]) -> bool:
    """Is sorted cost vector ``a`` lexicographically better than ``b`` (with a tolerance)?"""
    for x, y in zip(a, b, strict=True):
        tol = 1e-12 * max(abs(x), abs(y), 1e-30)
        if x < y - tol:
            return True
        if x > y + tol:
            return False
    return False


def refine(
    g: Indexed,
    stage: list[int],
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
    max_moves: int = 2000,
) -> list[int]:
    """Move single nodes between stages while the sorted stage costs improve."""
    st = _State(g, stage, specs, bw)
    cur = _key(st.costs())
    for _ in range(max_moves):
        if not _improve_once(st, cur):
            break
        cur = _key(st.costs())
    return st.stage


def _improve_once(st: _State, cur: list[float]) -> bool:
    g, stage = st.g, st.stage
    costs = st.costs()
    top = max(costs)
    hot = {j for j, c in enumerate(costs) if c >= top * (1 - 1e-12)}
    cands: set[int] = set()
    for v in range(g.n):
        if stage[v] in hot:
            cands.add(v)
            cands.update(g.preds[v])
            cands.update(g.succs[v])
    for v in sorted(cands):
        src = stage[v]
        lo = max((stage[u] for u in g.preds[v]), default=0)
        hi = min((stage[w] for w in g.succs[v]), default=len(st.specs) - 1)
        for dst in range(lo, hi + 1):
            if dst == src:
                continue
            st.move(v, dst)
            if st.fits(dst) and _better(_key(st.costs()), cur):
                return True
            st.move(v, src)
    return False
