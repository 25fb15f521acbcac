"""Solve the partition ILP (`formulation`) with HiGHS or CBC: MIP starts, time limits, and
the proven bound that the reported gap rests on.
"""

from __future__ import annotations

import functools
import logging
import time as _time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from partitioner.planner.cost import Bandwidth, DeviceSpec
from partitioner.planner.formulation import IlpInput, build_ilp, comm_ceiling, tie_weight
from partitioner.planner.windows import stage_windows

__all__ = ["IlpInput", "IlpResult", "available_solvers", "solve_ilp"]

#: the MIP gap handed to the solver, as a share of the gap asked for
GAP_MARGIN = 0.9

log = logging.getLogger(__name__)


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


def _highs_class(start: dict[str, float] | None) -> Any:
    import highspy
    import numpy as np
    import pulp

    class QuietHighs(highspy.Highs):  # type: ignore[misc]
        """A HiGHS model whose log is off before its first call, so the process's first
        instance prints no banner on stdout (HiGHS writes it unless ``output_flag`` is
        already false)."""

        def enableCallbacks(self) -> None:  # the first HiGHS call its __init__ makes
            self.setOptionValue("output_flag", False)
            super().enableCallbacks()

    class WarmHiGHS(pulp.HiGHS):  # type: ignore[misc]
        """pulp's HiGHS with a MIP start (pulp 3.3 passes none to HiGHS) and no banner.

        It sets no ``threads`` option: HiGHS keeps one thread scheduler per process, and
        an explicit count that differs from the one it started with fails the run ("Not
        Solved"), so a user's own HiGHS run earlier in the process would silently turn
        every plan into a heuristic one.
        """

        def createAndConfigureSolver(self, lp: Any) -> None:
            lp.solverModel = QuietHighs()
            lp.solverModel.setOptionValue("output_flag", False)
            if self.gapRel is not None:
                lp.solverModel.setOptionValue("mip_rel_gap", self.gapRel)
            if self.timeLimit is not None:
                lp.solverModel.setOptionValue("time_limit", float(self.timeLimit))

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
    prob, x, T = build_ilp(inp, specs, bw, objective, imbalance, scale, lo, hi)
    values = _start_values(start, prob) if start is not None else None
    limit = max(0.05, time_limit - (_time.perf_counter() - t0))
    # The solver's own stop rule is a little tighter than the gap asked for: the tie-break
    # term it also minimises comes off the bound afterwards, and a plan proven "within
    # gap" of the objective must stay within gap of the bottleneck.
    gap = GAP_MARGIN * gap
    if solver == "highs":
        cmd = _highs_class(values)(msg=False, timeLimit=limit, gapRel=gap)
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
    if prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        # A variable in no constraint and not in the objective (a group with no time, no
        # memory and no edges) never reaches the solver and keeps varValue None: any stage
        # in its window is as good, and `_stage_of` takes the last one.
        stage = [_stage_of(i, x, lo[i], hi[i], K) for i in range(len(inp.time))]
    bound = _bound(prob, solver, gap)
    proven = prob.sol_status == pulp.LpSolutionOptimal and stage is not None
    if objective == "throughput":
        # the objective adds eps * comm <= eps * T-scale terms; remove it to bound T
        bound = (
            max(
                0.0,
                bound - tie_weight(inp, specs, bw, scale) * comm_ceiling(inp, specs, bw, scale),
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
        value = x[i, k].varValue
        if value is not None and value > 0.5:
            return k
    return min(hi, K - 1)


def _bound(prob: Any, solver: str, gap: float) -> float:
    """The proven lower bound on the ILP's objective (0 when nothing is proven)."""
    import pulp

    # A solution the solver calls optimal is within ``gap`` of the optimum, whatever
    # bound it reports: HiGHS gives mip_dual_bound 0 when presolve or the root LP
    # finished the search (mip_gap inf), and CBC through pulp reports no bound at all.
    proven = 0.0
    if prob.sol_status == pulp.LpSolutionOptimal and prob.objective is not None:
        proven = max(0.0, float(pulp.value(prob.objective)) * (1 - gap))
    if solver == "highs":
        reported = float(prob.solverModel.getInfo().mip_dual_bound)
        if reported == reported and abs(reported) != float("inf"):
            return max(reported, proven)
    return proven
