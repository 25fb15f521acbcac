"""Who runs a training step's schedule: the caller's thread, or the workers themselves.

[Note: worker-driven steps]
An `Executor` holds one step's state; its actions are built (`Executor.build`: inputs taken,
values moved), computed, and finished (`Executor.finish`: outputs and gradients recorded)
in each device's schedule order, each once its needs are done ([Note: training step]).
Two loops do that:

- `by_caller`: the caller's thread is the scheduler. It builds every action and hands it to
  its device's worker, which hands the result back; every action is two thread hops and all
  the bookkeeping is serial on the caller (about 0.14 ms an action on a 2-core CPU, 2.3 ms
  of a 16-action step of two small Linear stages).
- `by_workers`: each device's worker gets one task, its whole list. Before each action it
  waits, on one condition all share, until the action's needs are done; it builds the
  action under the condition's lock, computes it outside, finishes it under the lock and
  wakes the others. A thread hop happens only where one device waits for another. The
  caller waits on the same condition for the end, the first failure (raised as `by_caller`
  raises it) or ``stage_timeout`` seconds without progress.

`by_workers` is for CPU-only pipelines: on CUDA, building an action orders the copies of
the caller's values after the caller's *current* stream (`runtime.transfer`), which in a
worker thread is the worker's own, so CUDA pipelines keep `by_caller`
(`runtime.training._run` chooses).
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from runtime.executor import Executor, Key
from runtime.worker import InQueue, OutQueue, Task

__all__ = ["by_caller", "by_workers"]


def by_caller(step: Executor, in_queues: Sequence[InQueue], out_queue: OutQueue) -> None:
    """Submit every device's actions in order, each once its needs are done, and take the
    results, until every action is done; the first failure is raised."""
    heads = [0] * step.k
    total = sum(len(ops) for ops in step.plan)
    queued: list[deque[tuple[Key, float]]] = [deque() for _ in range(step.k)]
    since = [0.0] * step.k
    timeout = step.pipe.stage_timeout
    while len(step.done) < total:
        for d, ops in enumerate(step.plan):
            while heads[d] < len(ops) and all(x in step.done for x in step.needs(ops[heads[d]])):
                key = ops[heads[d]]
                now = time.monotonic()
                if not queued[d]:
                    since[d] = now
                queued[d].append((key, now))
                in_queues[d].put(Task(key[2], key[0], _started(step, d, key), kind=key[1]))
                heads[d] += 1
        if not any(queued):
            stuck = [str(ops[h]) for h, ops in zip(heads, step.plan, strict=True) if h < len(ops)]
            raise RuntimeError(f"the schedule deadlocks, each device waiting: {stuck}")
        try:
            ok, (task, payload) = out_queue.get(timeout=timeout)
        except queue.Empty:  # the device whose task has run longest is not answering
            waiting = [(max(since[d], q[0][1]), d) for d, q in enumerate(queued) if q]
            err = step.stalled(queued[min(waiting)[1]][0][0], timeout)
            raise err from err.original
        d = task.j % step.k
        queued[d].popleft()
        since[d] = time.monotonic()
        key = (task.j, task.kind, task.i)
        if not ok:
            if payload is None:  # skipped while stopping; cannot come before a failure
                continue
            _raise(step, key, payload)
        step.finish(key, payload)


def _raise(step: Executor, key: Key, exc: BaseException) -> None:
    err = step.failed(key, exc)
    if err is exc:
        raise exc
    raise err from exc


def _started(step: Executor, d: int, key: Key) -> Any:
    compute, order, name = step.build(key), step.order[d], "{}{}{}".format(*key)

    def started() -> Any:
        order.append(name)
        return compute()

    return started


class _Drivers:
    """The shared state of `by_workers`: one condition, the first failure, and what each
    device is running (for the timeout) or waiting for (for a deadlock)."""

    def __init__(self, step: Executor) -> None:
        self.step = step
        self.cond = threading.Condition()
        self.failure: tuple[Key, BaseException] | None = None
        self.running: dict[int, tuple[Key, float]] = {}
        self.waiting: dict[int, Key] = {}
        self.ended: set[int] = set()

    def ready(self, key: Key) -> bool:
        return all(x in self.step.done for x in self.step.needs(key))

    def fail(self, key: Key, exc: BaseException) -> None:
        """Record the first failure and wake everyone (the caller holds the lock)."""
        if self.failure is None:
            self.failure = (key, exc)
        self.cond.notify_all()

    def device(self, d: int) -> None:
        """Device d's whole list, in its worker's thread; any exception stops the step."""
        try:
            self._device(d)
        except BaseException as e:
            with self.cond:
                self.fail(self.running.get(d, (self.step.plan[d][0], 0.0))[0], e)

    def _device(self, d: int) -> None:
        step, cond = self.step, self.cond
        for key in step.plan[d]:
            with cond:
                while self.failure is None and not self.ready(key):
                    self.waiting[d] = key
                    # every device waits, and none was woken by what it waits for
                    if len(self.waiting) + len(self.ended) == step.k and not any(
                        self.ready(other) for other in self.waiting.values()
                    ):
                        stuck = sorted(str(k) for k in self.waiting.values())
                        why = f"the schedule deadlocks, each device waiting: {stuck}"
                        self.fail(key, RuntimeError(why))
                        break
                    cond.wait()
                self.waiting.pop(d, None)
                if self.failure is not None:
                    return
                try:
                    compute = step.build(key)
                except BaseException as e:
                    self.fail(key, e)
                    return
                step.order[d].append("{}{}{}".format(*key))
                self.running[d] = (key, time.monotonic())
            try:
                payload = compute()
            except BaseException as e:
                with cond:
                    self.fail(key, e)
                return
            with cond:
                del self.running[d]
                if self.failure is not None:
                    return
                try:
                    step.finish(key, payload)
                except BaseException as e:
                    self.fail(key, e)
                    return
                cond.notify_all()
            del compute, payload
        with cond:
            self.ended.add(d)
            cond.notify_all()

    def wait(self, total: int, timeout: float | None) -> None:
        """Until every action is done; the first failure, or ``timeout`` seconds with no
        action finished, is raised (and stops the workers)."""
        step, cond = self.step, self.cond
        with cond:
            try:
                while len(step.done) < total and self.failure is None:
                    if not cond.wait(timeout) and self.running:
                        key = min(self.running.values(), key=lambda r: r[1])[0]
                        err = step.stalled(key, timeout)
                        self.fail(key, err)
                        raise err from err.original
            except BaseException as e:  # KeyboardInterrupt too: the workers stop
                self.fail((0, "F", 0), e)
                raise
            if self.failure is not None:
                _raise(step, *self.failure)


def by_workers(step: Executor, in_queues: Sequence[InQueue]) -> None:
    """Each device's worker runs its own list ([Note: worker-driven steps])."""
    drivers = _Drivers(step)
    for d, in_queue in enumerate(in_queues):
        in_queue.put(Task(0, d, functools.partial(drivers.device, d), kind="D"))
    drivers.wait(sum(len(ops) for ops in step.plan), step.pipe.stage_timeout)
