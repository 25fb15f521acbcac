"""Solve the partition ILP (`formulation`) with HiGHS or CBC: MIP starts, time limits, and
the proven bound that the reported gap rests on.

HiGHS runs in a worker process (`highs_proc`, [Note: HiGHS in a process]), which is killed
when it runs past the deadline or on Ctrl-C. `_Run` below is the in-process fallback
(``MODELSPLIT_HIGHS=thread``, or no worker process could start).

[Note: stopping HiGHS]
In-process, HiGHS runs on a worker thread of its own (`_Run`) while the calling thread
waits on an Event, so the caller stays responsive. A Ctrl-C (KeyboardInterrupt) in the
waiting thread, or the deadline passing, sets a flag that HiGHS reads through its MIP,
simplex and IPM interrupt callbacks; it stops at its next check and keeps its incumbent.
It checks between LP solves and nodes, not inside presolve, one LP or a sub-MIP heuristic,
which on the benchmark's 2606-node graph can be seconds apart (once, ~30 minutes in a
sub-MIP's presolve: the reason for the worker process). So a Ctrl-C waits `CANCEL_WAIT`
seconds for HiGHS and then raises anyway, and past the deadline HiGHS is waited for
`STOP_WAIT` seconds, then its result is dropped (the plan `solve` had stands). A run left
behind stops at its next check, or at its own time limit. The thread is not a daemon, so
an interpreter that exits meanwhile first waits for it: a daemon thread that calls back
into Python during finalization aborts the process. Its HiGHS gets a thread scheduler of
its own (HiGHS keeps one per calling thread), so a user's HiGHS run, whatever its
``threads``, does not clash with ours.
"""

from __future__ import annotations

import functools
import logging
import threading
import time as _time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from partitioner.planner import highs_proc
from partitioner.planner.cost import Bandwidth, DeviceSpec
from partitioner.planner.formulation import IlpInput, build_ilp, comm_ceiling, tie_weight
from partitioner.planner.windows import stage_windows

__all__ = ["IlpInput", "IlpResult", "available_solvers", "solve_ilp"]

#: the MIP gap handed to the solver, as a share of the gap asked for
GAP_MARGIN = 0.9
#: seconds a Ctrl-C waits for HiGHS to stop before the KeyboardInterrupt goes on anyway
CANCEL_WAIT = 0.5
#: seconds HiGHS, told to stop at the deadline, is waited for before its result is dropped
STOP_WAIT = 0.15
#: HiGHS's own time limit ends this share of the time left (at most HIGHS_MARGIN_CAP
#: seconds), plus HIGHS_RESERVE, early: it finishes its current unit of work past its limit
#: (up to 0.3 s seen on the benchmark graphs), and reading its answer takes time
HIGHS_MARGIN = 0.05
HIGHS_MARGIN_CAP = 1.0
HIGHS_RESERVE = 0.05
#: seconds per free binary that building a model costs (windows, PuLP rows, HiGHS arrays),
#: a little above the 60-100 us of the benchmark graphs: a model whose building would not
#: fit is skipped (`min_run` and BUILD_SLACK absorb a slower build)
BUILD_SECONDS = 1.2e-4
#: seconds a model's building may run past the time limit (the promise's constant covers it)
BUILD_SLACK = 0.1

log = logging.getLogger(__name__)


@dataclass
class IlpResult:
    stage: list[int] | None  # stage per group, or None when no solution came back
    bound: float  # proven lower bound on the objective (T, or comm seconds); 0 if none
    proven: bool  # the solver proved its solution within the requested gap
    infeasible: bool  # the solver proved that no solution exists
    solver: str
    seconds: float
    built: bool = True  # False: skipped, too large or too little time (see `solve_ilp`)


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


class _Run:
    """One HiGHS run on a worker thread, stoppable from the waiting one ([Note: stopping
    HiGHS])."""

    def __init__(self, highs: Any) -> None:
        self.highs = highs
        self.stop = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        for event in (highs.cbMipInterrupt, highs.cbSimplexInterrupt, highs.cbIpmInterrupt):
            event.subscribe(self._check)

    def _check(self, event: Any) -> None:
        if self.stop.is_set():
            event.interrupt()

    def _work(self) -> None:
        try:
            self.highs.run()
        except BaseException as e:  # handed to the waiting thread
            self.error = e
        finally:
            self.done.set()

    def wait(self, deadline: float) -> bool:
        """Run until HiGHS returns (True) or the deadline passes and it does not stop."""
        try:
            threading.Thread(target=self._work, name="modelsplit-highs").start()
            if not self.done.wait(max(0.0, deadline - _time.perf_counter())):
                self.stop.set()
                log.debug("ilp: HiGHS ran past the deadline; told to stop")
                if not self.done.wait(STOP_WAIT):
                    return False
        except BaseException:  # KeyboardInterrupt, or any exception from a signal handler
            self.stop.set()
            self.done.wait(CANCEL_WAIT)  # a second Ctrl-C here goes straight through
            raise
        if self.error is not None:
            raise self.error
        return True


def _highs_class(start: dict[str, float] | None, deadline: float) -> Any:
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
        """pulp's HiGHS with a MIP start (pulp 3.3 passes none to HiGHS), no banner, and a
        run that stops at ``deadline`` or on Ctrl-C ([Note: stopping HiGHS]).

        It sets no ``threads`` option: HiGHS keeps a thread scheduler per calling thread,
        and an explicit count that differs from the one it started with fails the run
        ("Not Solved"), which silently turned plans into heuristic ones after a user's
        own HiGHS run; with none, no run of the user's, before ours or after, clashes.
        """

        dropped = False  # HiGHS ran past the deadline and its result was not read
        answer: highs_proc.Answer | None = None  # the worker process's answer
        dual = float("nan")  # HiGHS's mip_dual_bound

        def createAndConfigureSolver(self, lp: Any) -> None:
            lp.solverModel = QuietHighs()
            lp.solverModel.setOptionValue("output_flag", False)
            if self.gapRel is not None:
                lp.solverModel.setOptionValue("mip_rel_gap", self.gapRel)

        def callSolver(self, lp: Any) -> None:
            h = lp.solverModel
            idx: list[int] = []
            val: list[float] = []
            if start:
                cols = {v.name: v.index for v in lp.variables()}
                idx = [cols[name] for name in start if name in cols]
                val = [start[name] for name in start if name in cols]
            if not highs_proc.in_process():
                try:
                    job = highs_proc.job_of(h, idx, val, self.gapRel, _solver_limit(deadline))
                    self.answer = highs_proc.run(job, deadline)
                    self.dropped = self.answer is None
                    return
                except highs_proc.WorkerUnavailable as e:
                    _fallback_warning(str(e))
            if idx:
                h.setSolution(
                    len(idx), np.array(idx, dtype=np.int32), np.array(val, dtype=np.float64)
                )
            h.setOptionValue("time_limit", _solver_limit(deadline))  # the model is built
            self.dropped = not _Run(h).wait(deadline)

        def findSolutionValues(self, lp: Any) -> Any:
            none = (pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound)
            if self.dropped:
                return none  # HiGHS may still be running: do not read its state
            if self.answer is not None:
                return highs_proc.assign(lp, self.answer)
            h = lp.solverModel
            self.dual = float(h.getInfo().mip_dual_bound)
            interrupted = h.getModelStatus() == highspy.HighsModelStatus.kInterrupt
            feasible = int(highspy.SolutionStatus.kSolutionStatusFeasible)
            if interrupted and h.getInfo().primal_solution_status != feasible:
                return none  # pulp reads "integer feasible" from an interrupt without one
            return super().findSolutionValues(lp)

    return WarmHiGHS


@functools.cache
def _fallback_warning(why: str) -> None:
    log.warning("ilp: %s; HiGHS runs in this process instead (it cannot be killed)", why)


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
    max_binaries: int | None = None,
    min_run: float = 0.0,
) -> IlpResult:
    """Solve the ILP and return within ``time_limit`` seconds (model building included).

    ``start`` (a stage per group) is passed as a MIP start. ``upper``: a bottleneck
    some plan reaches; stages outside `stage_windows` are then fixed, which keeps
    every assignment at least as good as ``upper`` (so the bound stays valid for
    the optimum) and tightens the LP. With ``upper`` a proven infeasibility only
    means no assignment of this level beats it. No model is built (no solution, bound
    0) when its free binaries exceed ``max_binaries``, or when building it would leave
    the solver less than ``min_run`` seconds. A KeyboardInterrupt stops HiGHS and goes
    on ([Note: stopping HiGHS]).
    """
    import pulp

    t0 = _time.perf_counter()
    deadline = t0 + time_limit
    K = len(specs)
    scale = max(sum(inp.time) / sum(s.speed for s in specs), 1e-12)
    if objective != "throughput":
        scale, upper = 1.0, None
    lo, hi = stage_windows(inp, specs, upper, bw)
    size = sum(b - a for a, b in zip(lo, hi, strict=True))
    left = deadline - _time.perf_counter()
    too_big = max_binaries is not None and size > max_binaries
    if too_big or BUILD_SECONDS * size + min_run > left + BUILD_SLACK:
        log.debug("ilp: %d free binaries, not built with %.2fs left", size, left)
        return IlpResult(None, 0.0, False, False, solver, _time.perf_counter() - t0, False)
    if upper is None:
        inp = IlpInput(inp.time, inp.mem, inp.edges, inp.tensors)  # floors need `upper`
    if start is not None and any(not a <= s <= b for s, a, b in zip(start, lo, hi, strict=True)):
        start = None  # outside the windows: it does not reach `upper`
    prob, x, T = build_ilp(inp, specs, bw, objective, imbalance, scale, lo, hi)
    log.debug("ilp: %d free binaries built in %.2fs", size, _time.perf_counter() - t0)
    # The solver's own stop rule is a little tighter than the gap asked for: the tie-break
    # term it also minimises comes off the bound afterwards, and a plan proven "within
    # gap" of the objective must stay within gap of the bottleneck.
    gap = GAP_MARGIN * gap
    dropped, dual = _run(prob, solver, start, gap, deadline)
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
    bound = 0.0 if dropped else _bound(prob, gap, dual)
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


def _run(
    prob: Any, solver: str, start: Sequence[int] | None, gap: float, deadline: float
) -> tuple[bool, float]:
    """Solve ``prob`` by ``deadline``: whether HiGHS ran past it and was dropped, and
    HiGHS's dual bound (nan when none: CBC, dropped)."""
    values = _start_values(start, prob) if start is not None else None
    if solver == "highs":
        cmd = _highs_class(values, deadline)(msg=False, gapRel=gap)
        prob.solve(cmd)
        dual = cmd.answer.dual_bound if cmd.answer is not None else cmd.dual
        return bool(cmd.dropped), float(dual)
    if values:
        for v in prob.variables():
            if v.name in values:
                v.setInitialValue(values[v.name])
    prob.solve(_cbc(_solver_limit(deadline), gap, bool(values)))
    return False, float("nan")


def _solver_limit(deadline: float) -> float:
    """The solver's own time limit: what is left until ``deadline``, less its margin."""
    left = deadline - _time.perf_counter()
    return max(0.01, left - min(HIGHS_MARGIN * left, HIGHS_MARGIN_CAP) - HIGHS_RESERVE)


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


def _bound(prob: Any, gap: float, dual: float) -> float:
    """The proven lower bound on the ILP's objective (0 when nothing is proven)."""
    import pulp

    # A solution the solver calls optimal is within ``gap`` of the optimum, whatever
    # bound it reports: HiGHS gives mip_dual_bound 0 when presolve or the root LP
    # finished the search (mip_gap inf), and CBC through pulp reports no bound at all.
    proven = 0.0
    if prob.sol_status == pulp.LpSolutionOptimal and prob.objective is not None:
        proven = max(0.0, float(pulp.value(prob.objective)) * (1 - gap))
    if dual == dual and abs(dual) != float("inf"):  # HiGHS's (nan from CBC)
        return max(dual, proven)
    return proven
