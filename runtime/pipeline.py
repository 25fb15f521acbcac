"""The pipeline parallelism of GPipe over stages placed on devices."""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from runtime import backward as _backward
from runtime.allocator import check_malloc, keep_freed_memory
from runtime.batchnorm import DeferredBatchNorm
from runtime.checkpoint import Checkpoint, checkpoint_stops, checkpointed, rng_locks
from runtime.checks import DeviceLike, check_args, check_schedule_option, parse_device
from runtime.errors import StageError
from runtime.grads import copied, detached
from runtime.interface import Const, check_written, write_back
from runtime.microbatch import Reducer, bound, capped, gather, scatter
from runtime.mutation import mutated_inputs
from runtime.recovery.faults import StageTimeout
from runtime.recovery.watch import gate
from runtime.route import route_for
from runtime.schedule import clock_cycles
from runtime.stream import Event, new_stream, record_event
from runtime.training import LossFn, TrainRecord, schedule_options, train_step
from runtime.transfer import Transfer
from runtime.worker import (
    InQueue,
    OutQueue,
    Task,
    TaskHook,
    WorkerSpec,
    available_cores,
    cycle_threads,
    spawn_workers,
)
from runtime.worker import stage_threads as _stage_threads

__all__ = ["Pipeline", "RunRecord", "TrainRecord", "schedule_options"]

log = logging.getLogger(__name__)

# Called with (the pipeline that failed, a `runtime.recovery.resume.Failure`); returns the pipeline
# that replaces it. See `runtime.recovery.resume`.
Replan = Callable[[Any, Any], Any]


@dataclass
class RunRecord:
    """What the last call did: the micro-batch sizes, which finished, and which task failed.

    ``completed`` lists the micro-batches whose last stage finished, in that order; with the
    per-task hook (`Pipeline.on_task`) it is what a fault-tolerant caller needs to retry.
    """

    sizes: list[int]
    completed: list[int] = field(default_factory=list)
    failed: tuple[int, int] | None = None

    @property
    def chunks(self) -> int:
        return len(self.sizes)


#: `Pipeline.run_call`'s "the pipeline's own reducer" (None is a reducer choice too)
_SAME: Any = object()


class Pipeline(nn.Module):
    """Run ``stages`` as a GPipe pipeline: stage j on ``devices[j]``, ``chunks`` micro-batches.

    ``stages`` are either the GraphModules of `partitioner.splitting.cut` (each with a
    `StageIO`) or plain modules run as a sequence. The caller places parameters; the pipeline moves
    activations to each consumer's device. ``checkpoint`` is a mode ("never", "except_last",
    "always") or one per stage; ``reducer`` ("mean", "sum" or a callable) combines outputs
    without a batch dimension; ``threads`` overrides the intra-op threads of CPU stages (an
    int, or one count per stage). ``on_task(i, j)`` runs in stage j's worker before it runs
    micro-batch i; what it raises fails that task; ``on_backward(i, j)``, when set, runs as
    stage j starts micro-batch i's backward (``backward="autograd"``: [Note: a device lost in
    backward] in `runtime.recovery.watch`). ``last_run`` is the latest call's `RunRecord`.

    Fault tolerance (`runtime.recovery.resume`): ``on_failure="replan"`` survives a device
    failure (`runtime.recovery.faults.is_device_failure`): ``replan(pipeline, failure)`` returns
    the pipeline to continue on (default: the failed stage moves onto a surviving neighbour's
    device), the micro-batches that did not complete run again on it, and later calls use it.
    ``stage_timeout`` (seconds) turns a worker that sends no result for that long into a
    `runtime.recovery.faults.StageTimeout`; its thread is left behind if it never stops.

    ``backward="pipelined"`` (CPU stages only) runs each stage's backward in its own worker,
    pipelined over micro-batches, when the caller calls ``backward()`` on the output; the
    default ``"autograd"`` leaves backward to autograd, which on the CPU runs the stages one
    after another on the calling thread ([Note: pipelined backward] in `runtime.backward`).

    ``deferred_batch_norm=True`` updates the running statistics of BatchNorm layers once per
    call, with the whole batch's statistics, instead of once per micro-batch
    ([Note: deferred batch norm] in `runtime.batchnorm`).

    ``schedule`` ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble") and ``virtual_stages``
    V are `train_step`'s defaults: with V > 1 the stages are K * V, stage s on the device of
    stage s % K (``devices`` repeat). A plain call runs GPipe's forward whatever they are.

    ``malloc="keep"`` (default) sets glibc's malloc, once per process, to keep freed memory
    for the next micro-batch rather than hand it back to the OS and page-fault it in again
    ([Note: CPU allocator] in `runtime.allocator`); ``"system"`` (or the environment variable
    ``MODELSPLIT_MALLOC=system``) leaves malloc as it is. Only pipelines with CPU stages do it.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        devices: Sequence[DeviceLike],
        *,
        chunks: int,
        checkpoint: Checkpoint = "never",
        reducer: Reducer | None = None,
        threads: int | Sequence[int | None] | None = None,
        on_task: TaskHook | None = None,
        on_failure: str = "raise",
        replan: Replan | None = None,
        stage_timeout: float | None = None,
        backward: str = "autograd",
        deferred_batch_norm: bool = False,
        schedule: str = "gpipe",
        virtual_stages: int = 1,
        malloc: str = "keep",
    ) -> None:
        super().__init__()
        self.devices = [parse_device(d) for d in devices]
        check_args(stages, self.devices, chunks, reducer, on_failure, stage_timeout, backward)
        self.num_workers = check_schedule_option(schedule, virtual_stages, self.devices)
        self.schedule, self.virtual_stages = schedule, virtual_stages
        self.stages = nn.ModuleList(stages)
        self.backward = backward
        # BatchNorm running statistics: once per call ([Note: deferred batch norm]).
        self._deferred = DeferredBatchNorm(stages) if deferred_batch_norm else None
        # Inputs each stage mutates in place: a per-task backward hands it a private copy.
        self._mutated = [mutated_inputs(stage) for stage in stages]
        self.chunks, self.min_rows = chunks, 1  # min_rows: of a micro-batch, on small batches
        self.checkpoint = checkpoint
        self.reducer = reducer
        self.on_task = on_task
        self.on_backward: TaskHook | None = None
        self.on_failure = on_failure
        self.replan = replan
        self.stage_timeout = stage_timeout
        self.last_run: RunRecord | None = None
        self.last_step: TrainRecord | None = None
        self._stops = checkpoint_stops(checkpoint, len(stages))
        self._route = route_for(stages)
        self._free = self._route.free_after()
        self.threads_option = threads
        self._threads = _stage_threads(self.devices, available_cores(), threads)
        # Streams are made once, here, and reused by every call.
        self._streams = [new_stream(d) for d in self.devices]
        self._transfer = Transfer(self.devices, self._streams)
        check_malloc(malloc)
        if any(d.type == "cpu" for d in self.devices):  # [Note: CPU allocator]
            keep_freed_memory(malloc)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Scatter the call into micro-batches, run them through the stages, gather."""
        if self.on_failure == "replan":
            from runtime.recovery.resume import resume

            return resume(self, args, kwargs)
        return self.run(*args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """One call with no recovery: the first failure is raised as a `StageError`."""
        return self.run_call(args, kwargs)[0]

    def run_call(
        self,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        chunks: int | None = None,
        reducer: Any = _SAME,
    ) -> tuple[Any, RunRecord]:
        """`run`, with this call's own micro-batch count and reducer, and its `RunRecord`.

        Nothing of the call lives on the pipeline but ``last_run`` (the latest call's, for
        people), so concurrent calls cannot change each other's; the `StageError` a failed
        call raises carries its micro-batch sizes as ``sizes`` (for re-running the rest).
        """
        chunks = self.chunks if chunks is None else chunks
        reducer = self.reducer if reducer is _SAME else reducer
        env = given = self._route.bind(tuple(args), dict(kwargs))
        if self._transfer.cpu_only:
            env = self._transfer.to_cpu(env)
        batches, sizes = scatter(env, chunks := capped(env, chunks, self.min_rows))
        check_written(self._route.writes, env, sizes)
        reducer = bound(reducer, args, kwargs, chunks)  # a CountedMean: this call's counts
        record = self.last_run = RunRecord(sizes)
        run = _Run(self, [dict(b) for b in batches], record)
        # The caller's values per micro-batch, for the pipelined backward's input gradients.
        caller = [dict(b) for b in batches] if run.graphs is not None else []
        specs = [
            WorkerSpec(d, s, t)
            for d, s, t in zip(self.devices, self._streams, self._threads, strict=True)
        ]
        threads_before = torch.get_num_threads()
        deferred = self._deferred.deferred() if self._deferred else contextlib.nullcontext()
        try:
            with (
                deferred,
                spawn_workers(specs, hook=self.on_task, join_timeout=self.stage_timeout) as (
                    in_queues,
                    out_queue,
                    _,
                ),
            ):
                run.start(in_queues, out_queue)
        except StageError as err:
            err.sizes = list(sizes)
            raise
        finally:
            # torch.set_num_threads in a worker also changes torch's process-wide default,
            # which new threads pick up: put it back ([Note: intra-op threads]).
            torch.set_num_threads(threads_before)
        pieces = [run.leaves(i, consts=False) for i in range(len(sizes))]
        if run.graphs is not None:
            leaves = _backward.attach(self, run.graphs, caller, pieces, sizes, reducer)
        else:
            leaves = gather(pieces, sizes, reducer)
        leaves = _put_consts(leaves, self._route.output_leaves)
        write_back(self._route.writes, self._route.output_leaves, given, leaves)
        return self._route.unflatten(leaves), record

    def train_step(
        self,
        *args: Any,
        target: Any,
        loss_fn: LossFn,
        schedule: str | None = None,
        virtual_stages: int | None = None,
        loss_reduction: str | Callable[[Any], Any] = "mean",
        **kwargs: Any,
    ) -> torch.Tensor:
        """One training step: forward, ``loss_fn(output, target)`` and backward of every
        micro-batch, each device's actions in the order of ``schedule`` (default: the
        pipeline's) on that device's worker, ``target`` scattered like the inputs.
        Parameter gradients are added to ``.grad`` as ``loss_fn(model(*args, **kwargs),
        target).backward()`` would; returns the step's loss, detached ([Note: training
        step] in `runtime.executor`, [Note: loss weighting] in `runtime.training`)."""
        return train_step(
            self,
            args,
            kwargs,
            target=target,
            loss_fn=loss_fn,
            schedule=schedule,
            virtual_stages=virtual_stages,
            loss_reduction=loss_reduction,
        )

    def extra_repr(self) -> str:
        devices = ", ".join(str(d) for d in self.devices)
        return f"devices=[{devices}], chunks={self.chunks}, checkpoint={self.checkpoint!r}"


def _put_consts(leaves: list[Any], spec: Sequence[str | Const]) -> list[Any]:
    return [
        leaf.value if isinstance(leaf, Const) else v for v, leaf in zip(leaves, spec, strict=True)
    ]


class _Run:
    """The state of one call: per micro-batch environments, events, and what is done."""

    def __init__(self, pipe: Pipeline, envs: list[dict[str, Any]], record: RunRecord) -> None:
        self.pipe = pipe
        self.route = pipe._route
        self.envs = envs
        self.record = record
        self.m, self.n = len(envs), len(pipe.stages)
        # Fill and drain tasks borrow the cores of idle CPU stages ([Note: borrowed cores]),
        # unless the caller fixed the threads.
        self.threads: list[list[int | None]] | None = None
        if pipe.threads_option is None:
            is_cpu = [d.type == "cpu" for d in pipe.devices]
            self.threads = cycle_threads(is_cpu, self.m, available_cores())
        self.stage_list = list(pipe.stages)  # ModuleList indexing costs ~1 us a task
        self.events: list[list[Event]] = [[None] * self.n for _ in envs]
        self.done: set[tuple[int, int]] = set()
        self.producer = self.route.producer
        grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        self.stops = pipe._stops(self.m) if grad else [0] * self.n
        # Stages that share a generator with a checkpointed random stage run one at a time
        # ([Note: random ops and recomputation] in runtime/checkpoint.py).
        self.locks = rng_locks(list(pipe.stages), pipe.devices, self.stops)
        # Each task's own graph, for the pipelined backward ([Note: pipelined backward]).
        self.graphs: _backward.StageGraphs | None = None
        if grad and pipe.backward == "pipelined":
            self.graphs = _backward.StageGraphs(self.m, self.n, self.locks)
        for env in envs:
            for name in pipe._free[0]:
                env.pop(name, None)

    def start(self, in_queues: list[InQueue], out_queue: OutQueue) -> None:
        """Submit tasks in clock-cycle order, each as soon as its micro-batch left the stage
        before: no barrier between cycles, and every stage meets micro-batches in order."""
        self.out_queue = out_queue
        for cycle in clock_cycles(self.m, self.n):
            for i, j in cycle:
                if j > 0:
                    self.wait_for(i, j - 1)
                in_queues[j].put(self.task(i, j))
        for i in range(self.m):
            self.wait_for(i, self.n - 1)

    def task(self, i: int, j: int) -> Task:
        pipe, env = self.pipe, self.envs[i]
        names = self.route.stage_inputs[j]
        values = [
            pipe._transfer.to_stage(env[name], self.producer[name], i, j, self.events)
            for name in names
        ]
        if self.graphs is not None:
            leaves = [detached(v) for v in values]
            self.graphs.inputs[i][j] = tuple(leaves)
            # autograd forbids changing a leaf in place: a stage that mutates an input
            # gets a copy, whose gradient flows back to the leaf.
            mutated = pipe._mutated[j]
            values = [copied(v) if k in mutated else v for k, v in enumerate(leaves)]
        stage, call, stream = self.stage_list[j], self.route.calls[j], pipe._streams[j]
        keep = i >= self.stops[j]

        def run(*values: Any) -> tuple[Any, ...]:
            return call(stage, values)

        lock = self.locks[j]

        def compute() -> tuple[tuple[Any, ...], Event]:
            with lock if lock is not None else contextlib.nullcontext():
                outputs = run(*values) if keep else checkpointed(run, *values)
            return gate(pipe, i, j, outputs), record_event(stream)

        return Task(i, j, compute, None if self.threads is None else self.threads[i][j])

    def wait_for(self, i: int, j: int) -> None:
        while (i, j) not in self.done:
            self.receive(i, j)

    def receive(self, i: int, j: int) -> None:
        """Take one result while waiting for task (i, j); past ``stage_timeout`` stage j,
        whose earlier micro-batches all ran, is the one not answering."""
        timeout = self.pipe.stage_timeout
        try:
            ok, (task, payload) = self.out_queue.get(timeout=timeout)
        except queue.Empty:
            late = min(k for k in range(i + 1) if (k, j) not in self.done)
            device = str(self.pipe.devices[j])
            self.fail(late, j, StageTimeout(device, f"no answer within {timeout}s"))
            return
        i, j = task.i, task.j
        if not ok:
            self.fail(i, j, payload)
            return
        outputs, event = payload
        if self.graphs is not None:
            self.graphs.outputs[i][j] = outputs
            self.graphs.record(i, self.route.stage_outputs[j], outputs)
        env = self.envs[i]
        env.update(zip(self.route.stage_outputs[j], outputs, strict=True))
        self.events[i][j] = event
        for name in self.pipe._free[j + 1]:
            env.pop(name, None)
        self.done.add((i, j))
        if j == self.n - 1:
            self.record.completed.append(i)

    def fail(self, i: int, j: int, exc: BaseException | None) -> None:
        if exc is None:  # skipped while stopping; cannot happen before a failure
            return
        self.record.failed = (i, j)
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: as they are
            raise exc
        completed = {
            k: self.route.unflatten(self.leaves(k, consts=True)) for k in self.record.completed
        }
        raise StageError(j, str(self.pipe.devices[j]), i, exc, completed) from exc

    def leaves(self, i: int, *, consts: bool) -> list[Any]:
        """The output leaves of micro-batch i, ready on the caller's streams."""
        values = []
        for leaf in self.route.output_leaves:
            if isinstance(leaf, Const):
                values.append(leaf.value if consts else None)
            else:
                value = self.envs[i][leaf]
                producer = self.producer[leaf]
                values.append(self.pipe._transfer.to_caller(value, producer, i, self.events))
        return values
