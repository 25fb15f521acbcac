"""solve's time limit and Ctrl-C: both hold for the whole solve, not only inside HiGHS."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
from strategies import transformer_graph

from partitioner import DeviceSpec, evaluate
from partitioner.planner import highs_proc
from partitioner.planner.bounds import receive_floors
from partitioner.planner.heuristics import index_graph
from partitioner.planner.ilp import available_solvers
from partitioner.planner.levels import floors_until
from partitioner.planner.solver import solve

needs_highs = pytest.mark.skipif("highs" not in available_solvers(), reason="needs HiGHS")


def _uneven(k: int) -> list[DeviceSpec]:
    return [DeviceSpec(f"d{i}", speed=1.0 + (i % 3) / 2) for i in range(k)]


@needs_highs
def test_the_time_limit_holds_on_a_graph_it_cannot_prove() -> None:
    # 4232 nodes, not proven in 2 s: before the budget covered every phase, the receive
    # floors alone took 3.4 s here and the solve 3.9-6.4 s.
    g = transformer_graph(192)
    t = time.perf_counter()
    plan = solve(g, _uneven(16), time_limit=2.0)
    wall = time.perf_counter() - t
    assert wall <= 1.1 * 2.0 + 0.3, f"time_limit=2 took {wall:.2f}s ({plan.meta})"
    assert evaluate(g, plan.assignment, plan.device_specs).valid


def _highs_running() -> bool:
    """A worker process solving, or (``MODELSPLIT_HIGHS=thread``) HiGHS's thread."""
    threads = any(t.name == "modelsplit-highs" for t in threading.enumerate())
    return threads or bool(highs_proc.busy_pids())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@needs_highs
def test_ctrl_c_during_the_ilp_raises_within_a_second() -> None:
    # One fine ILP that HiGHS cannot close in a minute: before, a Ctrl-C waited for the
    # whole time limit (58 s here), then came back as KeyboardInterrupt.
    g = transformer_graph(48, hidden=256, seq=64, vocab=8000, rate=1e12)
    done = threading.Event()
    seen: dict[str, Any] = {}

    def interrupt() -> None:  # half a second into the HiGHS run (or at 20 s without one)
        end = time.perf_counter() + 20.0
        while not _highs_running() and time.perf_counter() < end and not done.is_set():
            time.sleep(0.02)
        if not done.wait(0.5):
            seen["highs"], seen["at"] = _highs_running(), time.perf_counter()
            seen["pids"] = highs_proc.busy_pids()
            os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(0.0, interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            solve(g, _uneven(16), time_limit=60.0, coarsen=False)
        late = time.perf_counter() - seen["at"]
    finally:
        done.set()
        timer.join()
    assert late <= 1.5, f"KeyboardInterrupt came {late:.2f}s after the signal"
    assert seen["highs"], "the signal came before HiGHS ran"
    for pid in seen["pids"]:  # the worker process is killed, not left to finish
        assert not _alive(pid), f"the HiGHS worker {pid} kept running after the interrupt"
    for t in threading.enumerate():  # told to stop, HiGHS ends at its next check
        if t.name == "modelsplit-highs":
            t.join(30.0)
            assert not t.is_alive(), "HiGHS kept running after the interrupt"


def test_cut_short_floors_are_a_prefix_of_the_full_ones() -> None:
    g = index_graph(transformer_graph(12, hidden=64, seq=8, vocab=100, rate=1e9))
    specs = [DeviceSpec(f"d{k}") for k in range(4)]
    upper = 0.3 * sum(g.time)
    full = receive_floors(g, specs, upper)
    assert floors_until(g, specs, upper, time.perf_counter() + 60.0) == full
    assert any(full)
    cut = floors_until(g, specs, upper, time.perf_counter() - 1.0)
    assert all(c in (0.0, f) for c, f in zip(cut, full, strict=True))
