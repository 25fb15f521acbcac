"""Coarsening: shrink a CostGraph before the ILP, keeping a map back to its nodes.

Three passes contract groups of nodes; each keeps the group graph a DAG:

1. zero-cost nodes (time under 2% of ``cap``) join a neighbour: a source with
   one consumer (a parameter, a constant) joins that consumer; a node with one
   producer (a view, a getitem) joins that producer; else one with a single
   consumer joins it;
2. chains (a group with one successor whose only predecessor it is) merge,
   most expensive link first, while the merged time stays under ``cap``, so the
   cheapest cuts of a chain stay available;
3. regions: in a topological order of the groups, the positions whose cut (bytes
   crossing it) is within 25% of the cheapest cut inside a run ("cheap points":
   the residual stream between an attention and an MLP sub-block) delimit
   single-entry-single-exit regions; a region whose time is under ``cap``
   collapses into one group, a larger one is cut again at its own cheap points.

A contraction of edge a -> b is safe when a has no other successor or b no other
predecessor (no second a ~> b path can exist), and a run of consecutive groups in
a topological order is always safe (every path goes forward in that order).

The coarse problem is a *restriction*: its optimum is an upper bound for the fine
graph, never a lower bound. `partitioner.planner.solver` proves bounds on the fine graph.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import networkx as nx

from partitioner.planner.cost import NODE_ATTRS
from partitioner.planner.heuristics import topo_order

__all__ = ["Coarsening", "Tensor", "coarsen", "identity", "reduce_exact", "uncoarsen"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tensor:
    """A fine node's output that leaves its group: producer group, bytes, consumer groups."""

    src: str
    out_bytes: int
    dsts: tuple[str, ...]


@dataclass
class Coarsening:
    """A coarse CostGraph, its groups of fine nodes, and the tensors between groups.

    ``graph`` is a CostGraph whose node ``out_bytes`` is the sum of the tensors
    the group exports (an over-estimate when they go to different stages);
    ``tensors`` keep the exact communication for the ILP.
    """

    graph: nx.DiGraph
    members: dict[str, list[str]]
    tensors: list[Tensor] = field(default_factory=list)

    @property
    def owner(self) -> dict[str, str]:
        return {v: c for c, vs in self.members.items() for v in vs}


def uncoarsen(assignment: Mapping[str, int], coarsening: Coarsening) -> dict[str, int]:
    """Give every fine node the stage of its group."""
    return {v: assignment[c] for c, vs in coarsening.members.items() for v in vs}


class _Groups:
    """Union of fine nodes into groups with group-level adjacency, contracted in place."""

    def __init__(self, graph: nx.DiGraph) -> None:
        self.fine = graph
        self.members: dict[str, list[str]] = {v: [v] for v in graph.nodes}
        self.time = {v: float(graph.nodes[v]["time"]) for v in graph.nodes}
        self.mem = {
            v: int(graph.nodes[v]["param_bytes"]) + int(graph.nodes[v]["act_bytes"])
            for v in graph.nodes
        }
        self.succ: dict[str, set[str]] = {v: set(graph.successors(v)) for v in graph.nodes}
        self.pred: dict[str, set[str]] = {v: set(graph.predecessors(v)) for v in graph.nodes}

    def merge(self, keep: str, gone: str) -> None:
        """Contract group ``gone`` into ``keep`` (the caller checked it is safe)."""
        self.members[keep].extend(self.members.pop(gone))
        self.time[keep] += self.time.pop(gone)
        self.mem[keep] += self.mem.pop(gone)
        for s in self.succ.pop(gone):
            self.pred[s].discard(gone)
            if s != keep:
                self.pred[s].add(keep)
                self.succ[keep].add(s)
        for p in self.pred.pop(gone):
            self.succ[p].discard(gone)
            if p != keep:
                self.succ[p].add(keep)
                self.pred[keep].add(p)
        self.succ[keep].discard(keep)
        self.pred[keep].discard(keep)

    def order(self) -> list[str]:
        """Groups in a deterministic topological order."""
        q = nx.DiGraph()
        q.add_nodes_from(self.members)
        q.add_edges_from((a, b) for a, bs in self.succ.items() for b in bs)
        first = {c: min(self._rank[v] for v in vs) for c, vs in self.members.items()}
        return list(nx.lexicographical_topological_sort(q, key=lambda c: (first[c], c)))

    @property
    def _rank(self) -> dict[str, int]:
        if not hasattr(self, "_rank_cache"):
            self._rank_cache = {v: i for i, v in enumerate(topo_order(self.fine))}
        return self._rank_cache


def _zero_cost(gs: _Groups, tiny: float, exact: bool = False) -> None:
    """Join zero-time sources to their one consumer, and tiny nodes along chain links.

    A tiny node joins a neighbour only over a link that is the neighbour's only
    one: merging a LayerNorm into the residual add that also feeds the next block
    would lose the cheapest cut of a transformer. With ``exact``, only merges that
    keep an optimal assignment: a source of time 0 (and no memory, unless memory is
    not limited: the caller decides) joins its one consumer, whose stage then stops
    receiving it; a node of time 0, no output and no memory joins its one producer.
    """
    for v in topo_order(gs.fine):
        if v not in gs.members or gs.time[v] > tiny:
            continue
        if not gs.pred[v] and len(gs.succ[v]) == 1:
            (w,) = gs.succ[v]
            gs.merge(w, v)
        elif exact:
            if gs.mem[v] == 0 and _narrows(gs, v):
                (u,) = gs.pred[v]
                gs.merge(u, v)
        elif len(gs.pred[v]) == 1 and len(gs.succ[next(iter(gs.pred[v]))]) == 1:
            (u,) = gs.pred[v]
            gs.merge(u, v)
        elif len(gs.succ[v]) == 1 and len(gs.pred[next(iter(gs.succ[v]))]) == 1:
            (w,) = gs.succ[v]
            gs.merge(w, v)


def _narrows(gs: _Groups, v: str) -> bool:
    """Whether free node ``v`` (time 0, no memory) may join its one producer exactly: it
    has no output, or it is one of the views (``getitem``s of a tuple) that are *all* its
    producer's readers, whose outputs add up to no more than the producer's. Then, with every
    view on the producer's stage, no stage receives more than before. A view beside readers
    of the whole output is not merged: when the output travels to a reader's stage anyway,
    the view there costs nothing, and on its producer's stage its output would travel too
    (hypothesis and a brute force found one: best 5.5 merged, 5.25 not)."""
    if len(gs.pred[v]) != 1:
        return False
    nodes = gs.fine.nodes
    out = int(nodes[v]["out_bytes"])
    if out == 0:
        return True
    inputs = list(gs.fine.predecessors(v))
    if len(gs.members[v]) != 1 or len(inputs) != 1:
        return False
    u = inputs[0]
    views = list(gs.fine.successors(u))
    free = all(
        float(nodes[w]["time"]) == 0
        and int(nodes[w]["param_bytes"]) + int(nodes[w]["act_bytes"]) == 0
        and gs.fine.in_degree(w) == 1
        for w in views
    )
    return free and sum(int(nodes[w]["out_bytes"]) for w in views) <= int(nodes[u]["out_bytes"])


def _link_bytes(gs: _Groups, a: str, b: str) -> int:
    nodes = gs.fine.nodes
    inside = set(gs.members[b])
    return sum(
        int(nodes[u]["out_bytes"])
        for u in gs.members[a]
        if any(w in inside for w in gs.fine.successors(u))
    )


def _chains(gs: _Groups, cap: float, mem_cap: float) -> None:
    links = [
        (a, next(iter(gs.succ[a])))
        for a in gs.members
        if len(gs.succ[a]) == 1 and len(gs.pred[next(iter(gs.succ[a]))]) == 1
    ]
    links.sort(key=lambda ab: (-_link_bytes(gs, *ab), ab))
    for a, b in links:
        if a not in gs.members or b not in gs.members or gs.succ[a] != {b}:
            continue
        if len(gs.pred[b]) == 1 and _fits(gs, [a, b], cap, mem_cap):
            gs.merge(a, b)


def _fits(gs: _Groups, groups: list[str], cap: float, mem_cap: float) -> bool:
    return sum(gs.time[c] for c in groups) <= cap and sum(gs.mem[c] for c in groups) <= mem_cap


#: (first cut position, last cut position, bytes) of a tensor crossing group boundaries
Span = tuple[int, int, int]


def _regions(gs: _Groups, cap: float, mem_cap: float) -> None:
    order = gs.order()
    pos = {c: i for i, c in enumerate(order)}
    owner = {v: c for c, vs in gs.members.items() for v in vs}
    spans: list[Span] = []
    for u in gs.fine.nodes:
        last = max((pos[owner[w]] for w in gs.fine.successors(u)), default=-1)
        if last > pos[owner[u]]:
            spans.append((pos[owner[u]] + 1, last, int(gs.fine.nodes[u]["out_bytes"])))
    # cut[i]: bytes crossing between order[:i] and order[i:]; a difference array
    delta = [0] * (len(order) + 2)
    for lo, hi, nbytes in spans:
        delta[lo] += nbytes
        delta[hi + 1] -= nbytes
    cut, run = [0] * (len(order) + 1), 0
    for i in range(len(order) + 1):
        run += delta[i]
        cut[i] = run
    acc = [0.0]
    for c in order:
        acc.append(acc[-1] + gs.time[c])
    runs: list[tuple[int, int]] = []
    _split_run(cut, acc, spans, 0, len(order), cap, runs)
    for a, b in runs:
        run_groups = order[a:b]
        if len(run_groups) > 1 and _fits(gs, run_groups, cap, mem_cap):
            for c in run_groups[1:]:
                gs.merge(run_groups[0], c)


def _split_run(
    cut: list[int],
    acc: list[float],
    spans: list[Span],
    a: int,
    b: int,
    cap: float,
    runs: list[tuple[int, int]],
) -> None:
    """Cut order[a:b] at its cheap points, recursively, until every run is under ``cap``.

    Tensors crossing every cut inside the run (a tied weight, an attention mask
    read by every block) are left out of "cheap": no cut inside can avoid them.
    """
    if acc[b] - acc[a] <= cap or b - a < 2:
        runs.append((a, b))
        return
    spans = [sp for sp in spans if sp[0] < b and sp[1] > a]
    common = sum(n for lo, hi, n in spans if lo <= a + 1 and hi >= b - 1)
    least = min(cut[a + 1 : b]) - common
    points = [i for i in range(a + 1, b) if cut[i] - common <= 1.25 * least]
    bounds = [a, *points, b]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        if (lo, hi) == (a, b):
            runs.append((a, b))
        else:
            _split_run(cut, acc, spans, lo, hi, cap, runs)


def identity(graph: nx.DiGraph) -> Coarsening:
    """The trivial coarsening: one group per node."""
    return _build(graph, _Groups(graph))


def reduce_exact(graph: nx.DiGraph, memory_limited: bool) -> Coarsening:
    """Only the merges that keep every optimal value: the ILP on it proves fine bounds.

    Zero-time sources with one consumer (parameters, constants) join it (when
    memory is limited, only those that hold no memory), and zero-time nodes with
    no output bytes and no memory join their one producer. Neither move can raise
    a stage's cost, so some optimal assignment has them merged.
    """
    gs = _Groups(graph)
    if memory_limited:
        _exact_limited(gs)
    else:
        _zero_cost(gs, tiny=0.0, exact=True)
    return _build(graph, gs)


def _exact_limited(gs: _Groups) -> None:
    for v in topo_order(gs.fine):
        if v not in gs.members or gs.time[v] > 0 or gs.mem[v] > 0:
            continue
        if not gs.pred[v] and len(gs.succ[v]) == 1:
            (w,) = gs.succ[v]
            gs.merge(w, v)
        elif _narrows(gs, v):
            (u,) = gs.pred[v]
            gs.merge(u, v)


def coarsen(
    graph: nx.DiGraph, stages: int, *, fraction: float = 0.25, mem_cap: float = float("inf")
) -> Coarsening:
    """Contract ``graph`` for a ``stages``-way split; no group exceeds ``fraction`` of a stage.

    ``mem_cap`` bounds a group's memory (param + act bytes) so that coarsening never
    makes a memory limit infeasible on its own.
    """
    gs = _Groups(graph)
    total = sum(gs.time.values())
    cap = fraction * total / max(1, stages)
    n0 = len(gs.members)
    _zero_cost(gs, tiny=0.02 * cap)
    n1 = len(gs.members)
    _chains(gs, cap, mem_cap)
    n2 = len(gs.members)
    _regions(gs, cap, mem_cap)
    _chains(gs, cap, mem_cap)
    log.debug(
        "coarsen: %s nodes -> %s (zero-cost) -> %s (chains) -> %s (regions)",
        n0,
        n1,
        n2,
        len(gs.members),
    )
    return _build(graph, gs)


def _build(graph: nx.DiGraph, gs: _Groups) -> Coarsening:
    owner = {v: c for c, vs in gs.members.items() for v in vs}
    rank = {v: i for i, v in enumerate(topo_order(graph))}
    members = {c: sorted(vs, key=rank.__getitem__) for c, vs in gs.members.items()}
    tensors = []
    for u in sorted(graph.nodes, key=rank.__getitem__):
        dsts = sorted({owner[w] for w in graph.successors(u)} - {owner[u]})
        if dsts:
            tensors.append(Tensor(owner[u], int(graph.nodes[u]["out_bytes"]), tuple(dsts)))
    coarse = nx.DiGraph()
    coarse.graph.update(graph.graph)
    for c, vs in members.items():
        attrs = {a: sum(graph.nodes[v][a] for v in vs) for a in NODE_ATTRS}
        attrs["out_bytes"] = sum(t.out_bytes for t in tensors if t.src == c)
        attrs["order"] = min(rank[v] for v in vs)
        coarse.add_node(c, **attrs)
    for t in tensors:
        coarse.add_edges_from((t.src, d) for d in t.dsts)
    return Coarsening(coarse, members, tensors)
