"""HiGHS in a worker process ([Note: HiGHS in a process]): a run that will not stop is
killed at the deadline, a dead worker is a fallback not a failure, an orphan exits."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from strategies import transformer_graph

from partitioner import DeviceSpec, evaluate
from partitioner.planner import highs_proc
from partitioner.planner.ilp import available_solvers
from partitioner.planner.solver import solve

pytestmark = pytest.mark.skipif("highs" not in available_solvers(), reason="needs HiGHS")

ROOT = Path(__file__).resolve().parents[1]

# says it is ready, takes one job, then never answers (HiGHS stuck where it checks nothing)
HANGS = """
import os, pickle, sys, time
out = os.fdopen(os.dup(1), "wb")
pickle.dump({"ready": True}, out); out.flush()
pickle.load(sys.stdin.buffer)
time.sleep(3600)
"""
# says it is ready, takes one job, then dies
DIES = """
import os, pickle, sys
out = os.fdopen(os.dup(1), "wb")
pickle.dump({"ready": True}, out); out.flush()
pickle.load(sys.stdin.buffer)
sys.stderr.write("simulated crash\\n"); sys.stderr.flush()
os._exit(3)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet has exited: it does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _graph():  # type: ignore[no-untyped-def]
    return transformer_graph(12, hidden=64, seq=8, vocab=100, rate=1e9)


def _specs(k: int = 2) -> list[DeviceSpec]:
    return [DeviceSpec(f"d{i}", speed=1.0 + (i % 3) / 2) for i in range(k)]


@pytest.fixture
def fake_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Install a fake worker script; the pool starts empty and is emptied after."""

    def install(source: str) -> None:
        script = tmp_path / "worker.py"
        script.write_text(textwrap.dedent(source))
        monkeypatch.setattr(highs_proc, "WORKER", str(script))

    monkeypatch.setattr(highs_proc, "_idle", [])
    yield install
    highs_proc._close_all()


def test_a_worker_that_never_answers_is_killed_at_the_deadline(fake_worker, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake_worker(HANGS)
    started: list[int] = []
    real_take = highs_proc._take

    def take() -> highs_proc._Worker:
        w = real_take()
        started.append(w.pid)
        return w

    monkeypatch.setattr(highs_proc, "_take", take)
    g = _graph()
    t = time.perf_counter()
    plan = solve(g, _specs(), time_limit=2.0)
    wall = time.perf_counter() - t
    assert started, "the ILP never ran"
    assert wall <= 1.1 * 2.0 + 0.3, f"time_limit=2 took {wall:.2f}s"
    assert plan.status == "heuristic", plan.status  # the ILP gave nothing
    assert evaluate(g, plan.assignment, plan.device_specs).valid
    for pid in started:
        assert not _alive(pid), f"worker {pid} still runs after the deadline"
    assert not highs_proc.busy_pids()


def test_a_worker_that_dies_falls_back_to_highs_in_process(fake_worker, caplog) -> None:  # type: ignore[no-untyped-def]
    g = _graph()
    want = solve(g, _specs(), time_limit=10.0)
    highs_proc._close_all()  # the next solve starts a worker: the fake
    fake_worker(DIES)
    with caplog.at_level(logging.WARNING, logger="partitioner.planner.ilp"):
        got = solve(g, _specs(), time_limit=10.0)
    assert got.status == want.status == "optimal"
    assert got.bottleneck == pytest.approx(want.bottleneck, rel=0.011)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "exit code 3" in said and "simulated crash" in said, said
    assert "runs in this process instead" in said, said


def test_the_worker_is_kept_for_the_next_solve(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(highs_proc, "_idle", [])
    try:
        solve(_graph(), _specs(), time_limit=10.0)
        first = [w.pid for w in highs_proc._idle]
        solve(_graph(), _specs(4), time_limit=10.0)
        assert first and [w.pid for w in highs_proc._idle] == first
    finally:
        highs_proc._close_all()
    assert not any(_alive(pid) for pid in first)


def test_thread_mode_gives_the_same_plan(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    g = _graph()
    by_process = solve(g, _specs(4), time_limit=10.0)
    monkeypatch.setenv("MODELSPLIT_HIGHS", "thread")
    monkeypatch.setattr(highs_proc, "run", None)  # must not be called
    by_thread = solve(g, _specs(4), time_limit=10.0)
    assert by_thread.status == by_process.status == "optimal"
    assert by_thread.bottleneck == pytest.approx(by_process.bottleneck, rel=0.011)
    monkeypatch.setenv("MODELSPLIT_HIGHS", "threads")
    with pytest.raises(ValueError, match="MODELSPLIT_HIGHS must be 'process' or 'thread'"):
        highs_proc.in_process()


def test_a_worker_exits_when_its_parent_dies_mid_solve(tmp_path: Path) -> None:
    # The parent starts a solve HiGHS cannot finish in a minute, then dies without any
    # cleanup (os._exit): the worker, busy in HiGHS, must notice and exit by itself.
    parent = tmp_path / "parent.py"
    parent.write_text(
        textwrap.dedent(
            f"""
            import os, sys, threading, time
            sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
            from strategies import transformer_graph
            from partitioner import DeviceSpec
            from partitioner.planner import highs_proc
            from partitioner.planner.solver import solve

            def die():
                while not highs_proc.busy_pids():
                    time.sleep(0.02)
                time.sleep(0.5)
                print(*highs_proc.busy_pids(), flush=True)
                os._exit(0)

            threading.Thread(target=die, daemon=True).start()
            g = transformer_graph(48, hidden=256, seq=64, vocab=8000, rate=1e12)
            specs = [DeviceSpec(f"d{{i}}", speed=1.0 + (i % 3) / 2) for i in range(16)]
            solve(g, specs, time_limit=60.0, coarsen=False)
            print("solve ended before the parent died", flush=True)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(parent)], capture_output=True, text=True, timeout=120
    ).stdout.split()
    assert out and out[0].isdigit(), out
    pids = [int(p) for p in out]
    end = time.monotonic() + 5.0
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    assert not left, f"HiGHS workers {left} outlived their parent by 5 s"
