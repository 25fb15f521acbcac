"""The partition ILP in prefix form, built with PuLP (solved by `ilp`).

Variables, for group i and stage k (K stages; ``x[i, K-1] = 1`` is implied)::

    x[i,k] in {0,1}   1 iff stage(i) <= k          x[i,k] <= x[i,k+1]
    y[i,k] = x[i,k] - x[i,k-1]                     1 iff stage(i) == k
    r[t,k] in [0,1]   tensor t is received by stage k (k >= 1)
    T >= 0            the bottleneck

Constraints::

    x[b,k] <= x[a,k]                    every edge a -> b (no edge goes backwards)
    r[t,k] >= y[d,k] - y[src(t),k]      every consumer group d of tensor t
    T >= sum_i time_i y[i,k] / speed_k + sum_t bytes_t r[t,k] / bw_k
    sum_i mem_i y[i,k] <= memory_k

``r >= y[d] - y[src]`` is exact at integer points (src is never after d) and
tighter in the LP than ``y[d,k] + x[src,k-1] - 1``. The prefix form has no big-M
and fixes the stage order, which removes the symmetry of interchangeable stages.

Throughput minimises ``T + eps * comm`` (eps keeps ties broken by fewer bytes
while the whole term stays under ``1e-6`` of the even share, which the reported
bound subtracts); balanced-cut minimises comm
subject to ``time_k / speed_k <= (1 + imbalance) * total / sum(speed)``.

Given ``upper`` (a bottleneck some plan reaches), x is fixed outside each group's
stage window (`partitioner.planner.windows`) and ``C_k >= floor_i / bw * y[i,k]``
adds what a stage holding group i must receive (`bounds.receive_floors`):
both hold for every plan at least as good, so the optimum stays in the model and
the dual bound, capped at ``upper``, stays valid.

With a bandwidth matrix the ILP charges tensor bytes at the fastest link into
stage k (``bw_k = max_s bw[s][k]``): never more than the true cost, so its bound
stays valid; plans are always re-evaluated exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from partitioner.planner.cost import Bandwidth, DeviceSpec, in_bandwidth

__all__ = ["EPS", "IlpInput", "build_ilp", "comm_ceiling", "tie_weight"]

#: the whole tie-break term of the throughput objective stays under EPS of the even share
EPS = 1e-6


@dataclass
class IlpInput:
    """Groups 0..n-1 with time and memory, precedence edges, and tensors between groups."""

    time: list[float]
    mem: list[int]
    edges: list[tuple[int, int]]
    tensors: list[tuple[int, int, list[int]]]  # (src group, bytes, consumer groups)
    #: bytes a stage holding the group must receive (`ilp_bounds.receive_floors`); only
    #: valid together with the ``upper`` it was computed for
    floor: list[float] | None = None


class _Model:
    """The PuLP problem being built, with the stage windows ``lo``/``hi`` of each group.

    ``x[i, k]`` (group i is in a stage <= k) exists only inside the window; outside it
    the value is fixed, so `x_terms` and `y_terms` return it as a constant instead.
    """

    def __init__(self, n: int, K: int, lo: list[int], hi: list[int]) -> None:
        import pulp

        self.pulp, self.K, self.lo, self.hi = pulp, K, lo, hi
        self.prob = pulp.LpProblem("partition", pulp.LpMinimize)
        self.x = {
            (i, k): self.var(f"x_{i}_{k}", 0, 1, "Integer")
            for i in range(n)
            for k in range(lo[i], min(hi[i], K - 1))
        }

    def var(
        self, name: str, low: float, high: float | None = None, cat: str = "Continuous"
    ) -> Any:
        if hasattr(self.prob, "add_variable"):  # PuLP >= 3.3; LpVariable(...) is deprecated
            return self.prob.add_variable(name, low, high, cat=cat)
        return self.pulp.LpVariable(name, low, high, cat=cat)

    def add(self, terms: dict[Any, float], sense: int, rhs: float) -> None:
        items = [(v, c) for v, c in terms.items() if c != 0]
        if items:
            expr = self.pulp.LpAffineExpression(items)
            self.prob.addConstraint(self.pulp.LpConstraint(expr, sense, rhs=rhs))

    def x_terms(self, i: int, k: int, coef: float, into: dict[Any, float]) -> float:
        """Add coef * x[i,k] to ``into``; return the constant part (x fixed outside windows)."""
        if k < self.lo[i]:
            return 0.0
        if k >= self.hi[i] or k >= self.K - 1:
            return coef
        into[self.x[i, k]] = into.get(self.x[i, k], 0.0) + coef
        return 0.0

    def y_terms(self, i: int, k: int, coef: float, into: dict[Any, float]) -> float:
        """Add coef * y[i,k] (group i is in stage k) to ``into``; return the constant part."""
        return self.x_terms(i, k, coef, into) + self.x_terms(i, k - 1, -coef, into)


def build_ilp(
    inp: IlpInput,
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
    objective: str,
    imbalance: float,
    scale: float,
    lo: list[int],
    hi: list[int],
) -> tuple[Any, dict[tuple[int, int], Any], Any]:
    m = _Model(len(inp.time), len(specs), lo, hi)
    _precedence(m, inp)
    comm = _receives(m, inp, bw, scale)
    if inp.floor is not None:
        _receive_floors(m, inp, comm, bw, scale)
    T = _stage_rows(m, inp, specs, comm, objective, imbalance, scale)
    every = [(v, c) for row in comm for v, c in row.items()]
    if objective == "throughput":
        eps = tie_weight(inp, specs, bw, scale)
        objective_terms = [(T, 1.0)] + [(v, eps * c / max(1, m.K)) for v, c in every]
        m.prob.setObjective(m.pulp.LpAffineExpression(objective_terms))
    else:
        m.prob.setObjective(m.pulp.LpAffineExpression(every))
    return m.prob, m.x, T


def _precedence(m: _Model, inp: IlpInput) -> None:
    """x is monotone in k, and an edge a -> b never goes backwards: x[a,k] >= x[b,k]."""
    ge = m.pulp.LpConstraintGE
    for i in range(len(inp.time)):
        for k in range(m.lo[i], min(m.hi[i], m.K - 1) - 1):
            m.add({m.x[i, k + 1]: 1.0, m.x[i, k]: -1.0}, ge, 0.0)
    for a, b in inp.edges:
        for k in range(min(m.lo[a], m.lo[b]), min(max(m.hi[a], m.hi[b]), m.K - 1)):
            terms: dict[Any, float] = {}
            const = m.x_terms(a, k, 1.0, terms) + m.x_terms(b, k, -1.0, terms)
            m.add(terms, ge, -const)


def _receives(m: _Model, inp: IlpInput, bw: Bandwidth, scale: float) -> list[dict[Any, float]]:
    """``r[t,k]`` = stage k receives tensor t; returns each stage's receive seconds as terms."""
    ge = m.pulp.LpConstraintGE
    comm: list[dict[Any, float]] = [{} for _ in range(m.K)]
    for t, (src, nbytes, dsts) in enumerate(inp.tensors):
        if nbytes == 0:
            continue
        for k in range(max(1, min(m.lo[d] for d in dsts)), max(m.hi[d] for d in dsts) + 1):
            if k < m.lo[src]:
                continue  # src is after k: no consumer can be in k either
            r = m.var(f"r_{t}_{k}", 0, 1)
            for d in dsts:  # r - y[d,k] + y[src,k] >= 0
                terms = {r: 1.0}
                const = m.y_terms(d, k, -1.0, terms) + m.y_terms(src, k, 1.0, terms)
                m.add(terms, ge, -const)
            comm[k][r] = nbytes / in_bandwidth(bw, k, m.K) / scale
    return comm


def _receive_floors(
    m: _Model, inp: IlpInput, comm: list[dict[Any, float]], bw: Bandwidth, scale: float
) -> None:
    """C_k = comm_k and C_k >= floor_i / bw * y[i,k]: a stage holding group i receives at
    least its floor (`bounds.receive_floors`)."""
    floor = inp.floor or []
    ge, eq = m.pulp.LpConstraintGE, m.pulp.LpConstraintEQ
    link = max(in_bandwidth(bw, k, m.K) for k in range(m.K))
    for k in range(1, m.K):
        held = [(i, f) for i, f in enumerate(floor) if f > 0 and m.lo[i] <= k <= m.hi[i]]
        if not held:
            continue
        ck = m.var(f"C_{k}", 0)
        expr = m.pulp.LpAffineExpression([(ck, 1.0)] + [(v, -c) for v, c in comm[k].items()])
        m.prob.addConstraint(m.pulp.LpConstraint(expr, eq, rhs=0.0))
        for i, f in held:
            terms = {ck: 1.0}
            const = m.y_terms(i, k, -f / link / scale, terms)
            m.add(terms, ge, -const)


def _stage_rows(
    m: _Model,
    inp: IlpInput,
    specs: Sequence[DeviceSpec],
    comm: list[dict[Any, float]],
    objective: str,
    imbalance: float,
    scale: float,
) -> Any:
    """Per stage: T >= load + receive (throughput) or load <= its share (balanced-cut), and
    memory <= the device's limit. Returns T."""
    ge, le = m.pulp.LpConstraintGE, m.pulp.LpConstraintLE
    n = len(inp.time)
    limit = (1 + imbalance) * sum(inp.time) / sum(s.speed for s in specs)
    T = m.var("T", 0)
    for k, spec in enumerate(specs):
        load: dict[Any, float] = {}
        const = sum(m.y_terms(i, k, inp.time[i] / spec.speed / scale, load) for i in range(n))
        if objective == "throughput":  # T - load - comm >= const
            terms = {T: 1.0}
            for v, c in list(load.items()) + list(comm[k].items()):
                terms[v] = terms.get(v, 0.0) - c
            m.add(terms, ge, const)
        else:
            m.add(load, le, limit / scale - const)
        if spec.memory is not None:
            mem: dict[Any, float] = {}
            const = sum(m.y_terms(i, k, float(inp.mem[i]), mem) for i in range(n))
            m.add(mem, le, spec.memory - const)
    return T


def tie_weight(inp: IlpInput, specs: Sequence[DeviceSpec], bw: Bandwidth, scale: float) -> float:
    """Weight of comm in the throughput objective: its whole term stays under 1e-6 * scale."""
    return EPS / max(1.0, comm_ceiling(inp, specs, bw, scale))


def comm_ceiling(inp: IlpInput, specs: Sequence[DeviceSpec], bw: Bandwidth, scale: float) -> float:
    K = len(specs)
    per_stage = sum(b for _, b, _ in inp.tensors) / min(in_bandwidth(bw, k, K) for k in range(K))
    return per_stage / scale
