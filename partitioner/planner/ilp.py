"""The partition ILP in prefix form, built with PuLP and solved by HiGHS or CBC.

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
adds what a stage holding group i must receive (`ilp_bounds.receive_floors`):
both hold for every plan at least as good, so the optimum stays in the model and
the dual bound, capped at ``upper``, stays valid.

With a bandwidth matrix the ILP charges tensor bytes at the fastest link into
stage k (``bw_k = max_s bw[s][k]``): never more than the true cost, so its bound
stays valid; plans are always re-evaluated exactly.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time as _time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from partitioner.planner.cost import Bandwidth, DeviceSpec
from partitioner.planner.windows import in_bandwidth as _in_bandwidth
from partitioner.planner.windows import stage_windows

__all__ = ["IlpInput", "IlpResult", "available_solvers", "solve_ilp"]

log = logging.getLogger(__name__)

_EPS = 1e-6


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


@dataclass
class IlpResult:
    stage: list[int] | None  # stage per group, or None when no solution came back
    bound: float  # proven lower bound on the objective (T, or comm seconds); 0 if none
    proven: bool  # the solver proved its solution within the requested gap
    infeasible: bool  # the solver proved that no solution exists
    solver: str
    seconds: float


@functools.cache
def available_solvers() -> tuple[str, ...]:
    """The MILP solvers PuLP can run here, preferred first: ``("highs", "cbc")``."""
    import pulp

    found = []
    if pulp.HiGHS(msg=False).available():
        found.append("highs")
    if _cbc(1.0, 0.0, False).available():
        found.append("cbc")
    return tuple(found)


def _build(
    inp: IlpInput,
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
    objective: str,
    imbalance: float,
    scale: float,
    lo: list[int],
    hi: list[int],
) -> tuple[Any, dict[tuple[int, int], Any], Any]:
    import pulp

    n, K = len(inp.time), len(specs)
    prob = pulp.LpProblem("partition", pulp.LpMinimize)

    def new_var(name: str, low: float, high: float | None = None, cat: str = "Continuous") -> Any:
        if hasattr(prob, "add_variable"):  # PuLP >= 3.3; LpVariable(...) is deprecated there
            return prob.add_variable(name, low, high, cat=cat)
        return pulp.LpVariable(name, low, high, cat=cat)

    x = {
        (i, k): new_var(f"x_{i}_{k}", 0, 1, "Integer")
        for i in range(n)
        for k in range(lo[i], min(hi[i], K - 1))
    }
    ge, le = pulp.LpConstraintGE, pulp.LpConstraintLE

    def add(terms: dict[Any, float], sense: int, rhs: float) -> None:
        items = [(v, c) for v, c in terms.items() if c != 0]
        if items:
            prob.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(items), sense, rhs=rhs))

    def x_terms(i: int, k: int, coef: float, into: dict[Any, float]) -> float:
        """Add coef * x[i,k] to ``into``; return the constant part (x fixed outside windows)."""
        if k < lo[i]:
            return 0.0
        if k >= hi[i] or k >= K - 1:
            return coef
        into[x[i, k]] = into.get(x[i, k], 0.0) + coef
        return 0.0

    def y_terms(i: int, k: int, coef: float, into: dict[Any, float]) -> float:
        """Add coef * y[i,k] to ``into``; return the constant part."""
        return x_terms(i, k, coef, into) + x_terms(i, k - 1, -coef, into)

    for i in range(n):
        for k in range(lo[i], min(hi[i], K - 1) - 1):
            add({x[i, k + 1]: 1.0, x[i, k]: -1.0}, ge, 0.0)
    for a, b in inp.edges:  # x[a,k] - x[b,k] >= 0
        for k in range(min(lo[a], lo[b]), min(max(hi[a], hi[b]), K - 1)):
            terms: dict[Any, float] = {}
            const = x_terms(a, k, 1.0, terms) + x_terms(b, k, -1.0, terms)
            add(terms, ge, -const)
    comm: list[dict[Any, float]] = [{} for _ in range(K)]
    for t, (src, nbytes, dsts) in enumerate(inp.tensors):
        if nbytes == 0:
            continue
        for k in range(max(1, min(lo[d] for d in dsts)), max(hi[d] for d in dsts) + 1):
            if k < lo[src]:
                continue  # src is after k: no consumer can be in k either
            r = new_var(f"r_{t}_{k}", 0, 1)
            for d in dsts:  # r - y[d,k] + y[src,k] >= 0
                terms = {r: 1.0}
                const = y_terms(d, k, -1.0, terms) + y_terms(src, k, 1.0, terms)
                add(terms, ge, -const)
            comm[k][r] = nbytes / _in_bandwidth(bw, k, K) / scale
    if inp.floor is not None:  # C_k = comm_k; C_k >= floor_i / bw * y[i,k]
        link = max(_in_bandwidth(bw, k, K) for k in range(K))
        for k in range(1, K):
            if not any(f > 0 and lo[i] <= k <= hi[i] for i, f in enumerate(inp.floor)):
                continue
            ck = new_var(f"C_{k}", 0)
            prob.addConstraint(
                pulp.LpConstraint(
                    pulp.LpAffineExpression([(ck, 1.0)] + [(v, -c) for v, c in comm[k].items()]),
                    pulp.LpConstraintEQ,
                    rhs=0.0,
                )
            )
            for i, f in enumerate(inp.floor):
                if f > 0 and lo[i] <= k <= hi[i]:
                    terms = {ck: 1.0}
                    const = y_terms(i, k, -f / link / scale, terms)
                    add(terms, ge, -const)
    total = sum(inp.time)
    limit = (1 + imbalance) * total / sum(s.speed for s in specs)
    T = new_var("T", 0)
    for k, spec in enumerate(specs):
        load: dict[Any, float] = {}
        const = sum(y_terms(i, k, inp.time[i] / spec.speed / scale, load) for i in range(n))
        if objective == "throughput":  # T - load - comm >= const
            terms = {T: 1.0}
            for v, c in list(load.items()) + list(comm[k].items()):
                terms[v] = terms.get(v, 0.0) - c
            add(terms, ge, const)
        else:
            add(load, le, limit / scale - const)
        if spec.memory is not None:
            mem: dict[Any, float] = {}
            const = sum(y_terms(i, k, float(inp.mem[i]), mem) for i in range(n))
            add(mem, le, spec.memory - const)
    every = [(v, c) for k in range(K) for v, c in comm[k].items()]
    eps = _tie_weight(inp, specs, bw, scale)
    if objective == "throughput":
        prob.setObjective(
            pulp.LpAffineExpression([(T, 1.0)] + [(v, eps * c / max(1, K)) for v, c in every])
        )
    else:
        prob.setObjective(pulp.LpAffineExpression(every))
    return prob, x, T


@functools.cache
def _quiet_highs() -> None:
    """Create the first HiGHS instance with stdout closed: it prints a banner once."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()  # type: ignore[no-untyped-call]
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _highs_class(start: dict[str, float] | None) -> Any:
    import numpy as np
    import pulp

    _quiet_highs()

    class WarmHiGHS(pulp.HiGHS):  # type: ignore[misc]
        """pulp's HiGHS with a MIP start (pulp 3.3 passes none to HiGHS)."""

        def callSolver(self, lp: Any) -> None:
            if start:
                cols = {v.name: v.index for v in lp.variables()}
                idx = [cols[name] for name in start if name in cols]
                val = [start[name] for name in start if name in cols]
                lp.solverModel.setSolution(
                    len(idx), np.array(idx, dtype=np.int32), np.array(val, dtype=np.float64)
                )
            lp.solverModel.run()

    return WarmHiGHS


def _start_values(stage: Sequence[int], prob: Any) -> dict[str, float]:
    """Values of the free variables for a start; r from its x by the received rule."""
    vals: dict[str, float] = {}
    for v in prob.variables():
        parts = v.name.split("_")
        if parts[0] == "x":
            vals[v.name] = 1.0 if stage[int(parts[1])] <= int(parts[2]) else 0.0
    return vals


def solve_ilp(
    inp: IlpInput,
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
    *,
    objective: str = "throughput",
    imbalance: float = 0.05,
    solver: str = "highs",
    time_limit: float = 30.0,
    gap: float = 0.01,
    start: Sequence[int] | None = None,
    upper: float | None = None,
) -> IlpResult:
    """Solve the ILP within ``time_limit`` seconds (model building included).

    ``start`` (a stage per group) is passed as a MIP start. ``upper``: a bottleneck
    some plan reaches; stages outside `stage_windows` are then fixed, which keeps
    every assignment at least as good as ``upper`` (so the bound stays valid for
    the optimum) and tightens the LP. With ``upper`` a proven infeasibility only
    means no assignment of this level beats it.
    """
    import pulp

    t0 = _time.perf_counter()
    K = len(specs)
    scale = max(sum(inp.time) / sum(s.speed for s in specs), 1e-12)
    if objective != "throughput":
        scale, upper = 1.0, None
    lo, hi = stage_windows(inp, specs, upper, bw)
    if upper is None:
        inp = IlpInput(inp.time, inp.mem, inp.edges, inp.tensors)  # floors need `upper`
    if start is not None and any(not a <= s <= b for s, a, b in zip(start, lo, hi, strict=True)):
        start = None  # outside the windows: it does not reach `upper`
    prob, x, T = _build(inp, specs, bw, objective, imbalance, scale, lo, hi)
    values = _start_values(start, prob) if start is not None else None
    limit = max(0.05, time_limit - (_time.perf_counter() - t0))
    if solver == "highs":
        cmd = _highs_class(values)(msg=False, timeLimit=limit, gapRel=gap, threads=1)
    else:
        if values:
            for v in prob.variables():
                if v.name in values:
                    v.setInitialValue(values[v.name])
        cmd = _cbc(limit, gap, bool(values))
    prob.solve(cmd)
    seconds = _time.perf_counter() - t0
    status = pulp.LpStatus[prob.status]
    if status == "Infeasible":
        return IlpResult(None, upper or 0.0, False, True, solver, seconds)
    stage = None
    if prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible) and all(
        v.varValue is not None for v in x.values()
    ):
        stage = [_stage_of(i, x, lo[i], hi[i], K) for i in range(len(inp.time))]
    bound = _bound(prob, solver, gap)
    proven = prob.sol_status == pulp.LpSolutionOptimal and stage is not None
    if objective == "throughput":
        # the objective adds eps * comm <= eps * T-scale terms; remove it to bound T
        bound = (
            max(
                0.0,
                bound - _tie_weight(inp, specs, bw, scale) * _comm_ceiling(inp, specs, bw, scale),
            )
            * scale
        )
        if upper is not None:
            bound = min(bound, upper)
    log.debug("ilp %s: %s in %.2fs, bound %s", solver, status, seconds, bound)
    return IlpResult(stage, bound, proven, False, solver, seconds)


def _cbc(limit: float, gap: float, warm: bool) -> Any:
    import pulp

    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC for PuLP 4
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=limit, gapRel=gap, warmStart=warm)


def _stage_of(i: int, x: Any, lo: int, hi: int, K: int) -> int:
    for k in range(lo, min(hi, K - 1)):
        if x[i, k].varValue > 0.5:
            return k
    return min(hi, K - 1)


def _tie_weight(inp: IlpInput, specs: Sequence[DeviceSpec], bw: Bandwidth, scale: float) -> float:
    """Weight of comm in the throughput objective: its whole term stays under 1e-6 * scale."""
    return _EPS / max(1.0, _comm_ceiling(inp, specs, bw, scale))


def _comm_ceiling(
    inp: IlpInput, specs: Sequence[DeviceSpec], bw: Bandwidth, scale: float
) -> float:
    K = len(specs)
    per_stage = sum(b for _, b, _ in inp.tensors) / min(_in_bandwidth(bw, k, K) for k in range(K))
    return per_stage / scale


def _bound(prob: Any, solver: str, gap: float) -> float:
    import pulp

    if solver == "highs":
        info = prob.solverModel.getInfo()
        bound = float(info.mip_dual_bound)
        if bound != bound or abs(bound) == float("inf"):
            return 0.0
        return bound
    # CBC through pulp reports no bound: a proven solution is within gapRel of it
    if prob.sol_status == pulp.LpSolutionOptimal and prob.objective is not None:
        return max(0.0, float(pulp.value(prob.objective)) * (1 - gap))
    return 0.0
