"""Run a training schedule's actions: each device's list, in order, on that device's worker.

[Note: training step]
`Pipeline.train_step` runs forward, loss and backward of every micro-batch in the order of
``actions(schedule, K, M, V)`` (`partitioner.planner.schedules`): K lists of actions
``(stage, kind, micro-batch)``, one per device, stage s on device s % K. One worker thread per
device runs its list, each action as soon as what it needs is done (the workers themselves
on CPU, the caller's thread as scheduler with GPUs: [Note: worker-driven steps] in
`runtime.scheduling`), so each worker meets its actions in the schedule's order and the
memory follows the schedule (1F1B keeps at most K - k micro-batches alive on stage k, GPipe
all M):

- ``F`` (s, i) needs the forwards of the stages whose values stage s reads (skip connections
  included: `runtime.route`). It reads detached copies of its inputs, so every task owns a
  graph. The last stage's forward then runs the loss of micro-batch i on the model's output
  (`loss_fn(output_i, target_i)`, weighted: [Note: loss weighting] in `runtime.training`)
  and differentiates it at once with respect to the output leaves.
- ``B`` (s, i) needs F (s, i), the backward of every stage that read one of its outputs and,
  if an output is a model output, the loss: the gradients of a value read by several stages
  (or by the loss) are all there and summed before it runs. It is
  ``autograd.grad(outputs, inputs + parameters)``; parameter gradients are summed over
  micro-batches in the worker (`runtime.grads.accumulate`).
- zero-bubble splits the backward: ``B`` is the input-grad half, ``autograd.grad(outputs,
  inputs, retain_graph=True)``, which the stage before waits for; ``W`` (s, i) later takes the
  gradients with respect to the parameters from the same graph and frees it. (W walks the
  graph again from the outputs: it repeats the part of B's work between the outputs and the
  parameters, which torch.distributed.pipelining avoids by keeping intermediate gradients.)

These needs are a subset of what the chain a schedule is built for implies (F of s after F
of s - 1, B of s after B of s + 1), so no order that is valid for the chain deadlocks here.
A value is dropped from the micro-batch's environment once its last reader's task is built.
On CUDA each task runs on its stage's stream; values and gradients cross devices through
`runtime.transfer` with the producer's event, as in forward ([Note: copy and wait]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from runtime.checkpoint import checkpointed
from runtime.checks import check_loss
from runtime.errors import StageError
from runtime.grads import (
    accumulate,
    copied,
    detached,
    grad_of,
    output_grads,
    paired,
    stage_parameters,
    wants_grad,
)
from runtime.microbatch import tree_leaves
from runtime.recovery.faults import StageTimeout
from runtime.route import CALLER
from runtime.stream import Event, record_event, use_stream

if TYPE_CHECKING:
    from runtime.pipeline import Pipeline

__all__ = ["Contribution", "Executor", "LossFn"]

#: the loss of one micro-batch: loss_fn(model output, target) -> a scalar tensor
LossFn = Callable[[Any, Any], torch.Tensor]
#: an action as (stage, kind, micro-batch)
Key = tuple[int, str, int]
_PHASES = {"F": "forward", "B": "backward", "W": "weight-grad"}


@dataclass
class Contribution:
    """One reader's gradient of a value, per tensor leaf (None: no gradient), computed by
    stage ``source``, whose event in ``events[i][source]`` marks it written."""

    source: int
    grads: list[torch.Tensor | None]
    events: list[list[Event]]


class Executor:
    """One training step's state: environments, graphs, pending gradients, what is done."""

    def __init__(
        self,
        pipe: Pipeline,
        per_device: Sequence[Sequence[Any]],
        envs: list[dict[str, Any]],
        targets: list[Any],
        weights: list[float],
        loss_fn: LossFn,
        stops: Sequence[int],
        locks: Sequence[Any],
    ) -> None:
        self.pipe, self.route = pipe, pipe._route
        self.plan: list[list[Key]] = [
            [(a.stage, a.kind, a.microbatch) for a in ops] for ops in per_device
        ]
        self.k, self.m, self.n = len(per_device), len(envs), len(pipe.stages)
        self.envs, self.targets, self.weights, self.loss_fn = envs, targets, weights, loss_fn
        self.split = any(kind == "W" for ops in self.plan for _, kind, _ in ops)
        self.stages = list(pipe.stages)
        self.params = [stage_parameters(stage) for stage in self.stages]
        self.producer = self.route.producer
        self.outputs_named = list(
            dict.fromkeys(x for x in self.route.output_leaves if isinstance(x, str))
        )
        self._wire()
        # checkpointed tasks (i < stops[s]) and the generator locks they need
        # ([Note: random ops and recomputation] in runtime/checkpoint.py)
        self.stops = list(stops)
        self.locks = [lock if lock is not None else contextlib.nullcontext() for lock in locks]
        self.inputs: list[list[tuple[Any, ...]]] = [[()] * self.n for _ in envs]
        self.outputs: list[list[tuple[Any, ...]]] = [[()] * self.n for _ in envs]
        self.fevents: list[list[Event]] = [[None] * self.n for _ in envs]
        self.bevents: list[list[Event]] = [[None] * self.n for _ in envs]
        #: the latest backward event of each stage (the parameter gradients are ready after it)
        self.last: list[Event] = [None] * self.n
        self.pending: dict[tuple[int, str], list[Contribution]] = {}
        self.wrt: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
        self.kept: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.stage_grads: list[dict[int, torch.Tensor]] = [{} for _ in self.stages]
        self.owned: list[set[int]] = [set() for _ in self.stages]
        self.losses: list[torch.Tensor | None] = [None] * self.m
        self.done: set[Key] = set()
        #: the actions each device's worker started, in order (`TrainRecord.order`)
        self.order: list[list[str]] = [[] for _ in range(self.k)]
        self.left = [dict(self.uses) for _ in envs]
        for env in envs:
            for name in [name for name in env if not self.uses.get(name)]:
                env.pop(name)

    def _wire(self) -> None:
        """Who reads what: each stage's producers and consumers, and each value's readers."""
        route, n = self.route, self.n
        self.reads = [
            sorted({self.producer[name] for name in names} - {CALLER})
            for names in route.stage_inputs
        ]
        self.readers = [sorted(c for c in range(n) if j in self.reads[c]) for j in range(n)]
        outs = set(self.outputs_named)
        self.loss_reads = sorted({self.producer[name] for name in outs} - {CALLER, n - 1})
        self.feeds_loss = [bool(outs & set(names)) for names in route.stage_outputs]
        self.uses: dict[str, int] = dict.fromkeys(outs, 1)
        for names in route.stage_inputs:
            for name in names:
                self.uses[name] = self.uses.get(name, 0) + 1

    def needs(self, key: Key) -> list[Key]:
        """The actions ``key`` waits for (see the Note)."""
        s, kind, i = key
        if kind == "F":
            before = self.reads[s] + (self.loss_reads if s == self.n - 1 else [])
            return [(p, "F", i) for p in before]
        if kind == "W":
            return [(s, "B", i)]
        after = [(c, "B", i) for c in self.readers[s]]
        loss = [(self.n - 1, "F", i)] if self.feeds_loss[s] else []
        return [(s, "F", i), *after, *loss]

    # -- one action: built, run elsewhere, finished (runtime.scheduling) -----------
    def build(self, key: Key) -> Callable[[], Any]:
        """Action ``key``'s task: its inputs are taken now, its ``compute`` runs later."""
        s, kind, i = key
        if kind == "F":
            return self._forward(i, s)
        return self._backward(i, s) if kind == "B" else self._weight_grad(i, s)

    def finish(self, key: Key, payload: Any) -> None:
        """Record what action ``key``'s compute returned; it is done."""
        s, kind, i = key
        if kind == "F":
            self._forward_done(i, s, *payload)
        elif kind == "B":
            self._backward_done(i, s, *payload)
        else:
            self.last[s] = payload
        self.done.add(key)

    def failed(self, key: Key, exc: BaseException) -> BaseException:
        """What the caller raises for action ``key``'s exception: a `StageError`, or a
        KeyboardInterrupt / SystemExit as it is."""
        if not isinstance(exc, Exception):
            return exc
        s, _, i = key
        return StageError(s, str(self.pipe.devices[s]), i, exc)

    def stalled(self, key: Key, timeout: float | None) -> StageError:
        """Action ``key`` gave no answer for ``timeout`` seconds: a `StageError` wrapping
        `StageTimeout` that names it."""
        s, kind, i = key
        device = str(self.pipe.devices[s])
        why = f"no answer within {timeout}s in {_PHASES[kind]} ({s}{kind}{i})"
        return StageError(s, device, i, StageTimeout(device, why))

    # -- forward and loss -------------------------------------------------------------
    def _release(self, i: int, name: str) -> None:
        left = self.left[i]
        left[name] -= 1
        if left[name] <= 0:
            self.envs[i].pop(name, None)

    def _forward(self, i: int, s: int) -> Callable[[], Any]:
        pipe, env = self.pipe, self.envs[i]
        names = self.route.stage_inputs[s]
        values = [
            pipe._transfer.to_stage(env[name], self.producer[name], i, s, self.fevents)
            for name in names
        ]
        for name in names:
            self._release(i, name)
        leaves = [detached(v) for v in values]
        self.inputs[i][s] = tuple(leaves)
        mutated = pipe._mutated[s]  # autograd forbids changing a leaf in place: a copy
        args = [copied(v) if k in mutated else v for k, v in enumerate(leaves)]
        stage, call, stream = self.stages[s], self.route.calls[s], pipe._streams[s]
        keep, lock, hook = i >= self.stops[s], self.locks[s], pipe.on_task
        loss = self._loss(i) if s == self.n - 1 else None

        def run(*values: Any) -> tuple[Any, ...]:
            return call(stage, values)

        def compute() -> tuple[Any, ...]:
            with use_stream(stream):
                if hook is not None:
                    hook(i, s)
                with lock:
                    outputs = run(*args) if keep else checkpointed(run, *args)
                got = None if loss is None else loss(outputs)
                return outputs, got, record_event(stream)

        return compute

    def _forward_done(self, i: int, s: int, outputs: Any, loss: Any, event: Event) -> None:
        self.outputs[i][s] = outputs
        self.fevents[i][s] = event
        env = self.envs[i]
        for name, value in zip(self.route.stage_outputs[s], outputs, strict=True):
            env[name] = value
            self.left[i].setdefault(name, 0)
            if self.left[i][name] <= 0 or (loss is not None and name in self.outputs_named):
                self._release(i, name)  # read by nobody, or by the loss just now
        if loss is not None:
            value, grads = loss
            self.losses[i] = value
            for name, parts in grads:
                self.pending.setdefault((i, name), []).append(Contribution(s, parts, self.fevents))

    def _loss(self, i: int) -> Callable[[tuple[Any, ...]], Any]:
        """Micro-batch i's weighted loss and its gradients with respect to the output
        leaves, run by the last stage right after its forward."""
        pipe, env, s, route = self.pipe, self.envs[i], self.n - 1, self.route
        own = route.stage_outputs[s]
        early: dict[str, Any] = {}
        for name in self.outputs_named:
            if name not in own:
                early[name] = pipe._transfer.to_stage(
                    env[name], self.producer[name], i, s, self.fevents
                )
                self._release(i, name)
        target = pipe._transfer.to_stage(self.targets[i], CALLER, i, s, self.fevents)
        weight, loss_fn = self.weights[i], self.loss_fn

        def loss(outputs: tuple[Any, ...]) -> tuple[torch.Tensor, list[Any]]:
            values = {**early, **dict(zip(own, outputs, strict=True))}
            spec = route.output_leaves
            ends = [detached(values[x]) if isinstance(x, str) else x.value for x in spec]
            value = loss_fn(route.unflatten(list(ends)), target)
            check_loss(value)
            weighted = value * weight
            return weighted.detach(), output_grads(weighted, ends, spec)

        return loss

    # -- backward -----------------------------------------------------------------
    def _backward(self, i: int, s: int) -> Callable[[], Any]:
        route, pipe = self.route, self.pipe
        outputs, inputs = self.outputs[i][s], self.inputs[i][s]
        self.outputs[i][s] = self.inputs[i][s] = ()
        parts = [
            [
                pipe._transfer.to_stage(c.grads, c.source, i, s, c.events)
                for c in self.pending.pop((i, name), [])
            ]
            for name in route.stage_outputs[s]
        ]
        wrt: list[torch.Tensor] = []
        self.wrt[(i, s)] = []
        for name, value in zip(route.stage_inputs[s], inputs, strict=True):
            leaves = tree_leaves(value)
            for k, leaf in enumerate(leaves):
                if wants_grad(leaf):
                    wrt.append(leaf)
                    self.wrt[(i, s)].append((name, k, len(leaves)))
        split, params = self.split, self.params[s]
        sums, owned, stream = self.stage_grads[s], self.owned[s], pipe._streams[s]
        lock, hook, held = self.locks[s], pipe.on_backward, [outputs, parts]

        def compute() -> tuple[Any, ...]:
            with use_stream(stream):
                if hook is not None:
                    hook(i, s)
                tensors, grads = paired(*held)
                held.clear()
                targets = wrt + ([] if split else params)
                with lock:
                    found = grad_of(tensors, targets, grads, retain=split)
                for p, g in zip(params, found[len(wrt) :], strict=False):
                    if g is not None:
                        accumulate(sums, owned, id(p), g)
                kept = (tensors, grads) if split else None
                return found[: len(wrt)], kept, record_event(stream)

        return compute

    def _backward_done(
        self, i: int, s: int, input_grads: list[Any], kept: Any, event: Event
    ) -> None:
        self.bevents[i][s] = self.last[s] = event
        if kept is not None:
            self.kept[(i, s)] = kept
        by_name: dict[str, list[torch.Tensor | None]] = {}
        for (name, k, count), g in zip(self.wrt.pop((i, s)), input_grads, strict=True):
            if g is not None:
                by_name.setdefault(name, [None] * count)[k] = g
        for name, grads in by_name.items():
            self.pending.setdefault((i, name), []).append(Contribution(s, grads, self.bevents))

    def _weight_grad(self, i: int, s: int) -> Callable[[], Any]:
        held = list(self.kept.pop((i, s), ([], [])))
        params, sums, owned = self.params[s], self.stage_grads[s], self.owned[s]
        stream, lock = self.pipe._streams[s], self.locks[s]

        def compute() -> Event:
            with use_stream(stream):
                tensors, grads = held
                held.clear()  # the graph goes with the last reference to its outputs
                with lock:
                    found = grad_of(tensors, params, grads, retain=False)
                del tensors, grads
                for p, g in zip(params, found, strict=True):
                    if g is not None:
                        accumulate(sums, owned, id(p), g)
                return record_event(stream)

        return compute
