"""Worker threads: lifecycle, results, thread-local state, the threads rule."""

from __future__ import annotations

import threading

import pytest
import torch

from runtime.stream import CPUStream
from runtime.worker import Task, WorkerSpec, spawn_workers, stage_threads

CPU = torch.device("cpu")


def _specs(n: int, threads: int | None = None) -> list[WorkerSpec]:
    return [WorkerSpec(CPU, CPUStream, threads) for _ in range(n)]


def test_workers_run_tasks_and_are_joined() -> None:
    before = threading.active_count()
    with spawn_workers(_specs(2)) as (in_queues, out_queue, stop):
        assert threading.active_count() == before + 2
        in_queues[0].put(Task(0, 0, lambda: "a"))
        in_queues[1].put(Task(0, 1, lambda: threading.current_thread().name))
        results = {}
        for _ in range(2):
            ok, (task, payload) = out_queue.get()
            assert ok
            results[task.j] = payload
    assert results[0] == "a" and results[1].startswith("modelsplit-stage1-cpu")
    assert stop.is_set()
    assert threading.active_count() == before


def test_worker_reports_exceptions_and_keeps_going() -> None:
    def boom() -> None:
        raise KeyError("x")

    with spawn_workers(_specs(1)) as (in_queues, out_queue, _):
        in_queues[0].put(Task(3, 0, boom))
        in_queues[0].put(Task(4, 0, lambda: 1))
        ok, (task, exc) = out_queue.get()
        assert not ok and task.i == 3 and isinstance(exc, KeyError)
        assert out_queue.get()[0]


def test_worker_skips_tasks_once_stopped() -> None:
    ran = []
    with spawn_workers(_specs(1)) as (in_queues, out_queue, stop):
        stop.set()
        in_queues[0].put(Task(0, 0, lambda: ran.append(1)))
        ok, (_, payload) = out_queue.get()
    assert not ok and payload is None and ran == []


def test_hook_runs_before_each_task_in_the_worker() -> None:
    seen: list[tuple[int, int, str]] = []

    def hook(i: int, j: int) -> None:
        seen.append((i, j, threading.current_thread().name))
        if i == 1:
            raise RuntimeError("injected")

    with spawn_workers(_specs(1), hook=hook) as (in_queues, out_queue, _):
        in_queues[0].put(Task(0, 0, lambda: 0))
        in_queues[0].put(Task(1, 0, lambda: 1))
        assert out_queue.get()[0]
        ok, (_, exc) = out_queue.get()
    assert not ok and str(exc) == "injected"
    assert [s[:2] for s in seen] == [(0, 0), (1, 0)] and seen[0][2].startswith("modelsplit")


@pytest.mark.parametrize("grad", [True, False])
def test_workers_copy_grad_mode(grad: bool) -> None:
    with torch.set_grad_enabled(grad), spawn_workers(_specs(1)) as (in_queues, out_queue, _):
        in_queues[0].put(Task(0, 0, torch.is_grad_enabled))
        assert out_queue.get()[1][1] is grad


def test_workers_copy_inference_mode() -> None:
    with torch.inference_mode(), spawn_workers(_specs(1)) as (in_queues, out_queue, _):
        in_queues[0].put(Task(0, 0, torch.is_inference_mode_enabled))
        assert out_queue.get()[1][1] is True


def test_worker_sets_its_own_intraop_threads() -> None:
    main = torch.get_num_threads()
    with spawn_workers(_specs(2, threads=1)) as (in_queues, out_queue, _):
        for q in in_queues:
            q.put(Task(0, 0, torch.get_num_threads))
        counts = [out_queue.get()[1][1] for _ in in_queues]
        assert torch.get_num_threads() == main  # the caller's own count is its own
    assert counts == [1, 1]
    torch.set_num_threads(main)


def test_workers_are_joined_when_the_block_raises() -> None:
    before = threading.active_count()
    with pytest.raises(ZeroDivisionError), spawn_workers(_specs(3)):
        1 / 0  # noqa: B018
    assert threading.active_count() == before


def test_stage_threads_rule() -> None:
    cuda = torch.device("cuda", 0)
    assert stage_threads([CPU, CPU], 2, None) == [1, 1]
    assert stage_threads([CPU, CPU, CPU], 8, None) == [2, 2, 2]
    assert stage_threads([CPU, CPU, CPU], 2, None) == [1, 1, 1]
    assert stage_threads([CPU, cuda], 16, None) == [16, None]
    assert stage_threads([CPU, CPU], 16, 3) == [3, 3]
    assert stage_threads([CPU, CPU], 16, [1, 5]) == [1, 5]
    with pytest.raises(ValueError, match="one count per stage"):
        stage_threads([CPU, CPU], 16, [1])
    with pytest.raises(ValueError, match="positive integer"):
        stage_threads([CPU], 16, 0)


def test_cycle_threads_lend_idle_cores_in_fill_and_drain() -> None:
    from runtime.worker import cycle_threads

    # 2 CPU stages on 2 cores, 4 micro-batches: only (0, 0) and (3, 1) run alone.
    table = cycle_threads([True, True], 4, 2)
    assert table == [[2, 1], [1, 1], [1, 1], [1, 2]]
    # Never more threads in one cycle than cores: sum over the tasks of each cycle.
    for m, n, cores in [(8, 2, 2), (5, 3, 8), (2, 4, 4), (1, 3, 2)]:
        table = cycle_threads([True] * n, m, cores)
        for c in range(m + n - 1):
            used = sum(table[i][c - i] or 0 for i in range(m) if 0 <= c - i < n)
            assert used <= max(cores, n), (m, n, cores, c)
    # A GPU stage is not counted and keeps torch's default.
    assert cycle_threads([True, False], 2, 4) == [[4, None], [4, None]]


def test_worker_applies_a_tasks_thread_count() -> None:
    main = torch.get_num_threads()
    spec = WorkerSpec(torch.device("cpu"), CPUStream, 1)
    with spawn_workers([spec]) as (in_queues, out_queue, _):
        in_queues[0].put(Task(0, 0, torch.get_num_threads, threads=2))
        in_queues[0].put(Task(1, 0, torch.get_num_threads))
        seen = [out_queue.get()[1][1] for _ in range(2)]
    torch.set_num_threads(main)
    assert seen == [2, 2]  # a task without a count keeps the worker's current one
