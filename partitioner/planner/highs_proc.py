"""HiGHS in a process of its own, so that a run can always be stopped.

[Note: HiGHS in a process]
HiGHS does not check its time limit or its interrupt callbacks everywhere: on the planner
benchmark one run stayed ~30 minutes in the presolve of a nested sub-MIP (RENS), past both,
on a thread that kept its process from exiting (HiGHS issues #1501, #2226 report the same
class). A thread cannot be stopped from outside; a process can. So `run` hands the model to
a worker process (`highs_worker.py`, numpy and highspy only) and waits for the answer until
the deadline plus `STOP_WAIT`: the worker's HiGHS stops itself at its time limit, or at the
deadline through its interrupt callbacks, and a worker that has not answered by then is
killed (its result is dropped; the plan `solve` had stands). A Ctrl-C kills the busy worker
and goes on at once. Workers are kept for the next solve (starting one costs ~0.15 s), one
per concurrent solve; each ends when its stdin closes (at the latest when this process
exits) and by itself when its parent dies. It is in a session of its own, so a terminal's
Ctrl-C reaches only this process, which decides. ``MODELSPLIT_HIGHS=thread`` (or a worker
that cannot start) runs HiGHS on a thread of this process instead (`ilp._Run`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import select
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Answer",
    "WorkerUnavailable",
    "assign",
    "busy_pids",
    "in_process",
    "job_of",
    "peak_kib",
    "run",
]

#: seconds a worker that reached the deadline is waited for before it is killed
STOP_WAIT = 0.15
#: seconds a new worker has to say it is ready (import numpy and highspy)
START_WAIT = 20.0
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "highs_worker.py")

log = logging.getLogger(__name__)


class WorkerUnavailable(RuntimeError):
    """The worker process could not start or died: the caller runs HiGHS in-process."""


@dataclass
class Answer:
    status: int  # int(highspy.HighsModelStatus)
    col_value: Any  # numpy array, one value per column
    objective: float
    dual_bound: float
    primal_status: int  # int(highspy.SolutionStatus)


def in_process() -> bool:
    """True when HiGHS is to run on a thread here: ``MODELSPLIT_HIGHS=thread``, and on
    Windows, where `select` does not wait on pipes (POSIX only, as the worker is)."""
    default = "thread" if sys.platform == "win32" else "process"
    mode = os.environ.get("MODELSPLIT_HIGHS", default).strip().lower()
    if mode not in ("process", "thread"):
        raise ValueError(f"MODELSPLIT_HIGHS must be 'process' or 'thread' (got {mode!r})")
    return mode == "thread" or sys.platform == "win32"


class _Worker:
    def __init__(self) -> None:
        import highspy
        import numpy

        paths = [os.path.dirname(os.path.dirname(m.__file__ or "")) for m in (highspy, numpy)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            dict.fromkeys(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        )
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed in `close`)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, WORKER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.errors,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            self.errors.close()
            raise WorkerUnavailable(f"could not start {sys.executable} {WORKER}: {e}") from e
        try:
            ready = self.receive(time.perf_counter() + START_WAIT)
            if ready is None:
                raise WorkerUnavailable(self._died(f"not ready in {START_WAIT:.0f}s"))
        except BaseException:  # a Ctrl-C while it starts, or it died: nothing is left behind
            self.discard()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, job: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            pickle.dump(job, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerUnavailable(self._died(str(e))) from e

    def receive(self, deadline: float) -> dict[str, Any] | None:
        """The next answer, or None when the deadline passed first."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            if select.select([fd], [], [], left)[0]:
                break
        try:
            answer = pickle.load(self.proc.stdout)
        except (EOFError, pickle.UnpicklingError, OSError) as e:
            raise WorkerUnavailable(self._died(str(e) or type(e).__name__)) from e
        if not isinstance(answer, dict):
            raise WorkerUnavailable(self._died(f"it answered {type(answer).__name__}"))
        return answer

    def _died(self, why: str) -> str:
        self.kill()
        self.errors.seek(0)
        tail = self.errors.read()[-2000:].decode(errors="replace").strip()
        return f"the HiGHS worker process stopped ({why}, exit code {self.proc.returncode})" + (
            f": {tail}" if tail else ""
        )

    def peak_kib(self) -> int:
        """The worker's peak resident memory (VmHWM, KiB; 0 when unknown)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            _peaks[0] = max(_peaks[0], self.peak_kib())
            self.proc.kill()
        self.proc.wait()

    def discard(self) -> None:
        """Kill it and close its pipes and error file."""
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.errors):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def close(self) -> None:
        """Close its stdin (it exits by itself); kill it if it has not within a second."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(1.0)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.errors.close()


_lock = threading.Lock()
_idle: list[_Worker] = []
_busy: dict[int, _Worker] = {}
_peaks: list[int] = [0]  # the largest peak KiB of the workers killed so far


def _forget_all() -> None:
    """In a forked child: the parent's workers are the parent's (their pipes would be
    shared); drop this process's copies and start afresh."""
    global _lock
    _lock = threading.Lock()
    for w in _idle + list(_busy.values()):
        for pipe in (w.proc.stdin, w.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
    _idle.clear()
    _busy.clear()
    _peaks[0] = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all)


def _take() -> _Worker:
    with _lock:
        while _idle:
            w = _idle.pop()
            if w.proc.poll() is None:
                _busy[w.pid] = w
                return w
    w = _Worker()
    with _lock:
        _busy[w.pid] = w
    return w


def _release(w: _Worker, keep: bool) -> None:
    with _lock:
        _busy.pop(w.pid, None)
        if keep and w.proc.poll() is None:
            _idle.append(w)
            return
    w.discard()


def peak_kib() -> int:
    """The largest peak resident memory (KiB) of this process's HiGHS workers, the live
    ones and those killed (for the planner benchmark's memory column)."""
    with _lock:
        live = [w.peak_kib() for w in _idle + list(_busy.values())]
    return max([*live, _peaks[0]])


def busy_pids() -> list[int]:
    """Process ids of the workers solving right now (for tests and debugging)."""
    with _lock:
        return list(_busy)


@atexit.register
def _close_all() -> None:
    with _lock:
        workers = _idle + list(_busy.values())
        _idle.clear()
        _busy.clear()
    for w in workers:
        w.close()


def run(job: dict[str, Any], deadline: float) -> Answer | None:
    """Solve ``job`` (`highs_worker._solve`'s fields; ``seconds`` is set here from
    ``deadline``) in a worker process. None when it did not answer by ``deadline`` plus
    STOP_WAIT (it is killed). Raises WorkerUnavailable when no worker could run it."""
    w = _take()
    keep = False
    try:
        w.send({**job, "seconds": max(0.0, deadline - time.perf_counter())})
        answer = w.receive(deadline + STOP_WAIT)
        if answer is None:
            log.debug("ilp: the HiGHS worker ran past the deadline; killed")
            return None
        if "error" in answer:
            raise WorkerUnavailable(f"HiGHS failed in its worker process: {answer['error']}")
        keep = True
        return Answer(
            answer["status"],
            answer["col_value"],
            answer["objective"],
            answer["dual_bound"],
            answer["primal_status"],
        )
    finally:  # a KeyboardInterrupt, the deadline or an error: the worker is killed
        _release(w, keep)


def job_of(h: Any, idx: list[int], val: list[float], gap: float | None, limit: float) -> dict:
    """A built HiGHS model as the arrays `highs_worker` rebuilds it from."""
    import numpy as np

    lp = h.getLp()
    a = lp.a_matrix_
    options: dict[str, Any] = {"time_limit": limit}
    if gap is not None:
        options["mip_rel_gap"] = gap
    return {
        "num_col": lp.num_col_,
        "num_row": lp.num_row_,
        "col_cost": np.asarray(lp.col_cost_),
        "col_lower": np.asarray(lp.col_lower_),
        "col_upper": np.asarray(lp.col_upper_),
        "row_lower": np.asarray(lp.row_lower_),
        "row_upper": np.asarray(lp.row_upper_),
        "integrality": np.array([int(v) for v in lp.integrality_], dtype=np.int8),
        "sense": int(lp.sense_),
        "offset": float(lp.offset_),
        "format": int(a.format_),
        "start": np.asarray(a.start_),
        "index": np.asarray(a.index_),
        "value": np.asarray(a.value_),
        "options": options,
        "mip_start": (idx, val),
    }


def assign(lp: Any, answer: Answer) -> tuple[int, int]:
    """PuLP's (status, solution status) for a worker's answer, its values on ``lp``."""
    import highspy
    import pulp

    S = highspy.HighsModelStatus
    status = S(answer.status)
    has_solution = answer.primal_status == int(highspy.SolutionStatus.kSolutionStatusFeasible)
    stopped = {S.kInterrupt, S.kTimeLimit, S.kIterationLimit, S.kSolutionLimit, S.kMemoryLimit}
    stopped |= {S.kObjectiveBound, S.kObjectiveTarget}
    if status in (S.kInfeasible, S.kUnboundedOrInfeasible):
        return pulp.LpStatusInfeasible, pulp.LpSolutionInfeasible
    if status == S.kUnbounded:
        return pulp.LpStatusUnbounded, pulp.LpSolutionUnbounded
    if status == S.kOptimal:
        pair = pulp.LpStatusOptimal, pulp.LpSolutionOptimal
    elif status in stopped and has_solution:
        pair = pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible
    else:  # an error, or stopped with no solution: pulp would read one from zeros
        return pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound
    for var in lp.variables():
        var.varValue = float(answer.col_value[var.index])
    return pair
