"""Lower bounds on the bottleneck that hold for the fine (uncoarsened) problem.

Every bound here is valid for the optimum of the original graph; those that take
``upper`` (a bottleneck some plan reaches) reason only about assignments at
least as good, which is where the optimum lies.

* the trivial one: ``max(total time / total speed, heaviest node / fastest speed)``;
* the node-cut bound, per heavy node w. Let S be the union of the stages before
  stage(w) and D = S ∩ ancestors(w). Every ancestor of w outside D sits in
  stage(w) (it is neither before nor after it), and every tensor of D read by
  one of them is received by stage(w). So::

      C_stage(w) >= min over down-closed D ⊆ anc(w) of
                    time(anc*(w) \\ D) / fastest + bytes leaving D / fastest link

  a closure problem with a boundary charge, solved as a minimum s-t cut
  (s -> v: time(v); v -> p: inf for each predecessor p; u -> a_u: out_bytes(u)
  and a_u -> c: inf for each consumer c, so a tensor is charged once; w -> t).
  It proves plans whose bottleneck is one dominant node (a large LM head).
* the comm bound, [Note: comm bound] below.

[Note: comm bound]
Take an assignment with bottleneck T <= upper and B = upper * fastest speed.
(1) A node w whose heaviest incoming path is longer than B in time ("deep") can
share its stage with neither that path nor the first stage (which holds all
ancestors of its nodes). So the first stage, and any stage without a deep node,
hold only shallow nodes: together at most tau = time of the shallow nodes.
(2) A stage holding a deep node w receives at least the max-flow, with node
capacities out_bytes, from the ancestors u of w with a path u ~> w longer than
B (they sit in earlier stages) to w: every such path crosses a tensor the stage
reads. `receive_floors` gives the widest single path (a one-path flow) per node;
r = the least over deep nodes (lightest ones excepted, their time added to tau).
(3) Sum: total time <= sum over receiving stages of speed * (T - r / link)
+ min(tau, T * speed of the others). Maximised over how the speeds divide, this
is monotone in T; the least T that satisfies it is the bound. For a transformer
it is about total/K + (K-1)/K * (one hidden state) / bandwidth: the comm of the
K-1 cuts that the trivial bound ignores.
The floors also go into the ILP as ``comm_k >= floor(v) / link * y[v,k]``.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import networkx as nx

from partitioner.planner.cost import Bandwidth, DeviceSpec, lower_bound
from partitioner.planner.heuristics import Indexed

__all__ = ["comm_lower_bound", "fine_lower_bound", "node_cut_bound", "receive_floors"]


def _max_bandwidth(bw: Bandwidth, k: int) -> float:
    if isinstance(bw, int | float):
        return float(bw)
    vals = [float(bw[a][b]) for a in range(k) for b in range(k) if a != b]
    return max(vals, default=math.inf)


def node_cut_bound(
    g: Indexed, w: int, specs: Sequence[DeviceSpec], bw: Bandwidth, upper: float
) -> float:
    """The least cost of a stage that holds node ``w`` when the bottleneck is under ``upper``.

    See the module docstring; ancestors that cannot share w's stage (`_window`)
    are forced into the earlier stages, which keeps the cut problem small.
    """
    speed = max(s.speed for s in specs)
    link = _max_bandwidth(bw, len(specs))
    frontier, window = _window(g, w, upper * speed)
    if len(specs) == 1 or math.isinf(link):
        return upper if frontier else sum(g.time[v] for v in [w, *window]) / speed
    inside = {w, *window}
    flow = nx.DiGraph()
    src, sink = ("s",), ("t",)
    for z in frontier:
        flow.add_edge(src, z)  # no capacity attribute: infinite, z is in an earlier stage
    for v in inside:
        flow.add_edge(src, v, capacity=g.time[v] / speed)
        for p in g.preds[v]:
            flow.add_edge(v, p)
    for u in [*frontier, *window]:
        users = [c for c in g.succs[u] if c in inside]
        if users:
            flow.add_edge(u, ("a", u), capacity=g.out[u] / link)
            for c in users:
                flow.add_edge(("a", u), c)
    flow.add_edge(w, sink)
    value, _ = nx.minimum_cut(flow, src, sink)
    return min(float(value), upper)


def fine_lower_bound(
    graph: nx.DiGraph,
    g: Indexed,
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
    upper: float | None,
    floors: Sequence[float] | None = None,
    heavy: int = 3,
) -> float:
    """The best of the three bounds.

    ``upper``: a bottleneck some plan reaches (None: trivial bound only);
    ``floors``: `receive_floors` for that ``upper`` (computed here if None).
    """
    best = lower_bound(graph, specs)
    if upper is None:
        return best
    if floors is None:
        floors = receive_floors(g, specs, upper)
    best = max(best, comm_lower_bound(g, specs, bw, upper, best, floors))
    speed = max(s.speed for s in specs)
    for w in sorted(range(g.n), key=lambda v: (-g.time[v], v))[:heavy]:
        if g.time[w] / speed < 0.7 * best:  # its stage cannot be the bottleneck proof
            break
        best = max(best, node_cut_bound(g, w, specs, bw, upper))
    return best


# -- the comm bound ------------------------------------------------------------------------


def comm_lower_bound(
    g: Indexed,
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
    upper: float,
    start: float,
    floors: Sequence[float],
) -> float:
    """A bound that counts the bytes every loaded stage after the first must receive.

    Valid for the optimum when some plan reaches ``upper``; ``floors`` are
    `receive_floors` for ``upper``. See [Note: comm bound].
    """
    speeds = [s.speed for s in specs]
    total, sum_s, s_min = sum(g.time), sum(speeds), min(speeds)
    link = _max_bandwidth(bw, len(specs))
    if len(specs) == 1 or math.isinf(link) or upper <= 0:
        return start
    budget = upper * max(speeds)
    deep = _longest_into(g)
    heavy = [w for w in range(g.n) if deep[w] > budget and g.time[w] > 0]
    tau = sum(g.time[v] for v in range(g.n) if deep[v] <= budget)
    # the lightest heavy nodes may hide in stages we do not charge: count their time
    heavy.sort(key=lambda w: (g.time[w], w))
    slack = 0.05 * total / sum_s
    while heavy and g.time[heavy[0]] <= slack:
        slack -= g.time[heavy[0]]
        tau += g.time[heavy.pop(0)]
    if not heavy:
        return start
    r = _least_receive(g, heavy, floors, budget) / link

    def fits(t: float) -> bool:  # could some assignment have bottleneck t?
        a = min(max(sum_s - tau / t, 0.0), sum_s - s_min)
        return total <= max(0.0, t - r) * a + min(tau, t * (sum_s - a)) * (1 + 1e-12)

    lo, hi = start, upper
    if fits(lo):
        return start
    if not fits(hi):
        return upper
    for _ in range(60):
        mid = (lo + hi) / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return lo


def _least_receive(g: Indexed, heavy: list[int], floors: Sequence[float], budget: float) -> float:
    """min over ``heavy`` of a max-flow bound, starting from the widest paths (floors).

    Only the candidates whose floor is the smallest get a full flow (>= their
    floor); the minimum is exact once the smallest value comes from a flow.
    """
    queue = [(floors[w], w, False) for w in heavy]
    heapq.heapify(queue)
    while queue:
        value, w, exact = heapq.heappop(queue)
        if exact or value <= 0:
            return value
        nxt = queue[0][0] if queue else math.inf
        heapq.heappush(queue, (_window_flow(g, w, budget, nxt), w, True))
    return 0.0


def receive_floors(g: Indexed, specs: Sequence[DeviceSpec], upper: float) -> list[float]:
    """Bytes the stage of each node must receive in any assignment with bottleneck <= upper.

    0 for nodes whose ancestors could all share their stage; else the widest path
    from the ancestors that cannot (`_window`) to the node. The ILP adds
    ``comm_k >= floor(v) / bandwidth * y[v, k]``: valid, and it cuts off the
    fractional points where a node spread over stages receives nothing. Floors
    for a larger ``upper`` stay valid for a smaller one (they only get smaller).
    """
    budget = upper * max(s.speed for s in specs)
    deep = _longest_into(g)
    floors = [0.0] * g.n
    for w in range(g.n):
        if deep[w] > budget and g.time[w] > 0:
            frontier, window = _window(g, w, budget)
            if frontier:
                floors[w] = _widest(g, frontier, window, w)
    return floors


def _longest_into(g: Indexed) -> list[float]:
    """Time of the heaviest path ending at each node (a lower bound on its ancestors' time)."""
    deep = [0.0] * g.n
    for v in range(g.n):
        deep[v] = g.time[v] + max((deep[p] for p in g.preds[v]), default=0.0)
    return deep


def _window(g: Indexed, w: int, budget: float) -> tuple[list[int], list[int]]:
    """Ancestors of w split into those that cannot share w's stage (frontier) and the rest.

    A node u with a path u ~> w heavier than ``budget`` (in time) cannot sit in w's
    stage in an assignment whose bottleneck is under ``budget / fastest``: that
    path would sit in the stage too. The frontier is where the search stops.
    """
    dist = {w: g.time[w]}
    frontier, window = [], []
    heap = [-w]
    seen = {w}
    while heap:
        u = -heapq.heappop(heap)
        if u != w:
            if dist[u] > budget:
                frontier.append(u)
                continue
            window.append(u)
        du = dist[u]
        for p in g.preds[u]:
            d = g.time[p] + du
            if d > dist.get(p, -1.0):
                dist[p] = d
            if p not in seen:
                seen.add(p)
                heapq.heappush(heap, -p)
    return frontier, window


def _window_flow(g: Indexed, w: int, budget: float, enough: float) -> float:
    """A lower bound on the bytes a stage holding ``w`` receives (stops at ``enough``).

    Frontier nodes sit in earlier stages, and every path from them to w crosses a
    tensor that w's stage receives. A flow from them to w with node capacities
    ``out_bytes`` is a lower bound on those bytes (max-flow = min vertex cut).
    """
    frontier, window = _window(g, w, budget)
    if not frontier:
        return 0.0
    wide = _widest(g, frontier, window, w)
    if wide >= enough:
        return wide
    return max(wide, _max_flow(g, frontier, window, w, enough))


def _widest(g: Indexed, frontier: list[int], window: list[int], w: int) -> float:
    """The widest path from the frontier to w: a flow of one path, so a lower bound."""
    best: dict[int, float] = {z: float(g.out[z]) for z in frontier}
    for u in sorted(window):
        got = max((best[p] for p in g.preds[u] if p in best), default=-1.0)
        if got >= 0:
            best[u] = min(got, float(g.out[u]))
    return max((best[p] for p in g.preds[w] if p in best), default=0.0)


def _max_flow(g: Indexed, frontier: list[int], window: list[int], w: int, enough: float) -> float:
    inside = set(frontier) | set(window)
    # residual capacities on split nodes: ("i", u) -> ("o", u) carries out_bytes[u]
    cap: dict[tuple[Any, Any], float] = {}
    adj: dict[Any, list[Any]] = {}

    def arc(a: Any, b: Any, c: float) -> None:
        if (a, b) not in cap:
            adj.setdefault(a, []).append(b)
            adj.setdefault(b, []).append(a)
            cap[(a, b)] = 0.0
            cap.setdefault((b, a), 0.0)
        cap[(a, b)] += c

    for u in inside:
        arc(("i", u), ("o", u), float(g.out[u]))
        for s in g.succs[u]:
            if s == w:
                arc(("o", u), "t", math.inf)
            elif s in inside:
                arc(("o", u), ("i", s), math.inf)
    for z in frontier:
        arc("s", ("i", z), math.inf)
    flow = 0.0
    for _ in range(16):
        if flow >= enough:
            break
        parent: dict[Any, Any] = {"s": None}
        queue = deque(["s"])
        while queue and "t" not in parent:
            a = queue.popleft()
            for b in adj.get(a, ()):
                if b not in parent and cap[(a, b)] > 0:
                    parent[b] = a
                    queue.append(b)
        if "t" not in parent:
            break
        push, b = math.inf, "t"
        while parent[b] is not None:
            push = min(push, cap[(parent[b], b)])
            b = parent[b]
        b = "t"
        while parent[b] is not None:
            cap[(parent[b], b)] -= push
            cap[(b, parent[b])] += push
            b = parent[b]
        flow += push
    return flow
