"""Multithreading in pipeline parallelism: one worker thread per stage."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

import torch

from runtime.replica import replica_scope
from runtime.stream import AbstractStream, use_device, use_stream

__all__ = [
    "CallerState",
    "InQueue",
    "OutQueue",
    "Task",
    "TaskHook",
    "WorkerSpec",
    "available_cores",
    "cycle_threads",
    "spawn_workers",
    "stage_threads",
    "worker",
]

log = logging.getLogger(__name__)

# Called by the worker with (i, j) before it runs task (i, j); what it raises fails the task.
TaskHook = Callable[[int, int], None]


@dataclass
class Task:
    """Micro-batch i on stage j: ``compute()`` runs in stage j's worker thread."""

    i: int
    j: int
    compute: Callable[[], Any]
    #: intra-op threads for this task (None: keep the worker's count); see cycle_threads
    threads: int | None = None
    #: what the task does to (i, j): "F"orward, "B"ackward or "W"eight-grad (a schedule's action)
    kind: str = "F"


# A result is (ok, (task, payload)): the task's output when ok, else the exception it raised,
# or None for a task skipped because the pipeline was stopping.
Result = tuple[bool, tuple[Task, Any]]

# SimpleQueue is generic only in stubs.
if TYPE_CHECKING:
    InQueue = SimpleQueue[Task | None]
    OutQueue = SimpleQueue[Result]
else:
    InQueue = SimpleQueue
    OutQueue = SimpleQueue


@dataclass(frozen=True)
class WorkerSpec:
    """Where stage j's worker runs: its device, compute stream and intra-op thread count."""

    device: torch.device
    stream: AbstractStream
    threads: int | None = None


@dataclass(frozen=True)
class CallerState:
    """The thread-local torch state of the caller, which every worker copies."""

    grad_enabled: bool
    inference_mode: bool
    autocast: dict[str, torch.dtype]

    @classmethod
    def capture(cls, device_types: Sequence[str]) -> CallerState:
        autocast = {}
        for kind in set(device_types):
            if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
                autocast[kind] = torch.get_autocast_dtype(kind)
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast)

    def enter(self, stack: ExitStack, device: torch.device) -> None:
        """Apply this state to the current thread until ``stack`` closes."""
        torch.set_grad_enabled(self.grad_enabled)
        if self.inference_mode:
            stack.enter_context(torch.inference_mode())
        if device.type in self.autocast:
            dtype = self.autocast[device.type]
            stack.enter_context(torch.autocast(device.type, dtype=dtype))


def worker(
    in_queue: InQueue,
    out_queue: OutQueue,
    spec: WorkerSpec,
    state: CallerState,
    stop: threading.Event,
    hook: TaskHook | None,
) -> None:
    """The main loop of a worker thread: run tasks until None arrives.

    Device, stream, grad mode and intra-op threads are all thread-local in torch, so the
    worker sets them itself. Once ``stop`` is set, queued tasks are skipped, not run.
    """
    current = spec.threads
    if current is not None:
        torch.set_num_threads(current)
    with ExitStack() as stack:
        stack.enter_context(use_device(spec.device))
        stack.enter_context(use_stream(spec.stream))
        state.enter(stack, spec.device)
        stack.enter_context(replica_scope())  # [Note: tied-weight replicas]
        while True:
            task = in_queue.get()
            if task is None:
                break
            if stop.is_set():
                out_queue.put((False, (task, None)))
                continue
            try:
                if task.threads is not None and task.threads != current:
                    current = task.threads
                    torch.set_num_threads(current)
                if hook is not None:
                    hook(task.i, task.j)
                output = task.compute()
            except BaseException as exc:  # reported to the caller, who re-raises it
                out_queue.put((False, (task, exc)))
                continue
            out_queue.put((True, (task, output)))
            del task, output


@contextmanager
def spawn_workers(
    specs: Sequence[WorkerSpec],
    *,
    hook: TaskHook | None = None,
    name: str = "modelsplit",
    join_timeout: float | None = None,
    unit: str = "stage",
) -> Iterator[tuple[list[InQueue], OutQueue, threading.Event]]:
    """Start one daemon worker per spec; yield (in-queues, the shared out-queue, stop flag).
    Worker j is the thread ``{name}-{unit}{j}-{device}``.

    Whatever happens inside, the ``finally`` sets the stop flag, sends None to every worker
    and joins them all, so no worker outlives the block. With ``join_timeout``, a worker
    still busy after that many seconds (a hung device) is left behind as a daemon thread.
    """
    state = CallerState.capture([s.device.type for s in specs])
    out_queue: OutQueue = SimpleQueue()
    in_queues: list[InQueue] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()
    try:
        for j, spec in enumerate(specs):
            in_queue: InQueue = SimpleQueue()
            thread = threading.Thread(
                target=worker,
                args=(in_queue, out_queue, spec, state, stop, hook),
                name=f"{name}-{unit}{j}-{spec.device}",
                daemon=True,
            )
            thread.start()
            in_queues.append(in_queue)
            threads.append(thread)
        yield in_queues, out_queue, stop
    finally:
        stop.set()
        for in_queue in in_queues:
            in_queue.put(None)
        for thread in threads:
            thread.join(join_timeout)
            if thread.is_alive():
                log.warning(
                    "worker %s did not stop within %ss; left behind", thread.name, join_timeout
                )
        log.debug("joined %s workers", len(threads))


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def stage_threads(
    devices: Sequence[torch.device], cores: int, threads: int | Sequence[int | None] | None
) -> list[int | None]:
    """Intra-op threads per stage: ``threads`` if given, else max(1, cores // CPU stages).

    Stages on other devices than the CPU keep torch's default (None).

    [Note: intra-op threads]
    Checked with torch 2.13 (OpenMP backend, libgomp): `torch.set_num_threads(k)` called in
    a worker sets that thread's OpenMP ICV, so the worker's own ops use k threads and the
    caller's thread keeps its count: thread-local in effect. But torch also stores k as its
    process-wide default, which a thread that has not yet run a parallel op adopts on its
    first one (a fresh thread reads k). So each worker sets its own count, and
    `Pipeline.run` calls `torch.set_num_threads` with the caller's count once the
    workers are joined, which restores that default.
    """
    if threads is not None and not isinstance(threads, int):
        counts = list(threads)
        if len(counts) != len(devices):
            raise ValueError(
                f"threads must give one count per stage ({len(counts)} != {len(devices)})"
            )
        return counts
    cpu_stages = sum(1 for d in devices if d.type == "cpu")
    per_stage = threads if threads is not None else max(1, cores // max(1, cpu_stages))
    if per_stage < 1:
        raise ValueError(f"threads must be a positive integer ({per_stage} < 1)")
    return [per_stage if d.type == "cpu" else None for d in devices]


def cycle_threads(is_cpu: Sequence[bool], m: int, cores: int) -> list[list[int | None]]:
    """See `_cycle_threads`; cached, since a pipeline asks for the same table every call
    (the table is shared: read it, do not change it)."""
    return _cycle_threads(tuple(is_cpu), m, cores)


@functools.lru_cache(maxsize=64)
def _cycle_threads(is_cpu: tuple[bool, ...], m: int, cores: int) -> list[list[int | None]]:
    """Intra-op threads of task (i, j), as ``table[i][j]``: the cores shared by the CPU
    stages busy in its clock cycle.

    [Note: borrowed cores]
    In clock cycle c = i + j only the stages j with 0 <= c - j < m have work. During the
    fill and the drain some CPU stages idle, so the task that runs then borrows their
    cores: with 2 stages on 2 cores, micro-batch 0 on stage 0 and the last micro-batch on
    stage 1 run on 2 threads, every other task on 1. The count follows from the schedule
    alone, so two tasks of one cycle never both take the cores. Stages off the CPU get None.
    """
    n = len(is_cpu)
    table: list[list[int | None]] = []
    for i in range(m):
        row: list[int | None] = []
        for j in range(n):
            c = i + j
            busy = sum(1 for k in range(n) if is_cpu[k] and 0 <= c - k < m)
            row.append(max(1, cores // max(1, busy)) if is_cpu[j] else None)
        table.append(row)
    return table
