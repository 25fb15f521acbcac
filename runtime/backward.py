"""Pipelined backward: each stage's backward runs in its own worker (``backward="pipelined"``).

[Note: pipelined backward]
With ``backward="autograd"`` the stages form one autograd graph and ``loss.backward()``
runs it; on the CPU autograd runs every node on the calling thread, so the stages' backward
run one after another. With ``backward="pipelined"`` (CPU stages only):

- forward: each task reads detached copies of its input tensors (``requires_grad`` kept),
  so every (micro-batch i, stage j) task builds a graph of its own; the pipeline keeps its
  inputs and outputs until backward;
- the gathered output leaves come out of one `autograd.Function` whose inputs are the
  stages' parameters and the micro-batch slices of the caller's tensors that require grad.
  Its backward splits the output gradient per micro-batch (through the same gather and
  reducer, run under autograd), then runs task (i, j)'s backward,
  ``torch.autograd.grad(outputs, inputs + parameters)``, in stage j's worker thread, in
  reverse clock cycles (`runtime.schedule.backward_cycles`): stage j works on micro-batch
  i while stage j + 1 works on micro-batch i + 1. Gradients of a value read by several
  stages are summed before its producer runs, and parameter gradients over micro-batches
  in the worker, in a tensor of the pipeline's own (`runtime.grads.accumulate`: autograd
  may hand back one tensor for several gradients);
- ``stage_timeout`` holds as in forward: a stage that sends no result for that long is a
  `StageError` wrapping `StageTimeout`, naming the stage and micro-batch, and its worker is
  left behind (it skips what is queued once it returns);
- the Function returns the parameter gradients summed over micro-batches, so both
  ``loss.backward()`` (``.grad`` accumulates as usual) and ``torch.autograd.grad(loss,
  params)`` work.

Limits: one backward per forward (a second, as with ``retain_graph=True``, is a
RuntimeError naming the fix), no double backward (``create_graph``), CPU stages only: on
CUDA autograd already runs each device's backward on that device's own thread, and a
worker blocking an autograd device thread could deadlock.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
from torch.autograd.function import once_differentiable

from runtime.checks import BACKWARD_MODES
from runtime.errors import StageError
from runtime.grads import (
    accumulate,
    copied,
    detached,
    stage_parameters,
    sum_stages,
    wants_grad,
)
from runtime.microbatch import gather, tree_leaves
from runtime.recovery.faults import StageTimeout
from runtime.schedule import backward_cycles
from runtime.worker import (
    OutQueue,
    Task,
    WorkerSpec,
    available_cores,
    cycle_threads,
    spawn_workers,
)

if TYPE_CHECKING:
    from runtime.pipeline import Pipeline

__all__ = ["MODES", "StageGraphs", "attach", "copied", "detached"]

MODES = BACKWARD_MODES


class StageGraphs:
    """What each forward task keeps for its backward: its detached inputs and its outputs,
    and where each value's tensor leaves live (``layout[(i, name)]``, None for non-tensors),
    so a gradient goes back to its producer's device."""

    def __init__(self, m: int, n: int, locks: Sequence[Any] = ()) -> None:
        # locks[j]: held by stage j's backward tasks, which recompute checkpointed tasks
        # ([Note: random ops and recomputation] in runtime/checkpoint.py)
        self.locks = list(locks) or [None] * n
        self.inputs: list[list[tuple[Any, ...]]] = [[()] * n for _ in range(m)]
        self.outputs: list[list[tuple[Any, ...]]] = [[()] * n for _ in range(m)]
        self.layout: dict[tuple[int, str], list[torch.device | None]] = {}

    def record(self, i: int, names: Sequence[str], values: Sequence[Any]) -> None:
        for name, value in zip(names, values, strict=True):
            self.layout[(i, name)] = [
                leaf.device if isinstance(leaf, torch.Tensor) else None
                for leaf in tree_leaves(value)
            ]


def attach(
    pipe: Pipeline,
    graphs: StageGraphs,
    caller: list[dict[str, Any]],
    pieces: list[list[Any]],
    sizes: list[int],
    reducer: Any,
) -> list[Any]:
    """The gathered output leaves (``reducer``: this call's), differentiable through the
    pipelined backward.

    ``caller[i]`` holds micro-batch i's values from the caller (their slices, attached to
    the caller's graph), ``pieces[i]`` its output leaves (attached to the last tasks).
    """
    ends = [[detached(v) for v in piece] for piece in pieces]
    with torch.enable_grad():
        gathered = gather(ends, sizes, reducer)
    # An output value may be a pytree (a plain stage returning a tuple): work leaf by leaf.
    flat = [pytree.tree_flatten(value) for value in gathered]
    diff = [
        (k, idx) for k, (ls, _) in enumerate(flat) for idx, x in enumerate(ls) if wants_grad(x)
    ]
    if not diff:
        return [pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, v) for v in gathered]
    stage_params = [stage_parameters(stage) for stage in pipe.stages]
    params: dict[int, torch.Tensor] = {}
    for group in stage_params:
        for p in group:
            params.setdefault(id(p), p)
    slices = [
        (i, name, k, leaf)
        for i, env in enumerate(caller)
        for name, value in env.items()
        for k, leaf in enumerate(tree_leaves(value))
        if wants_grad(leaf)
    ]
    for i, env in enumerate(caller):
        graphs.record(i, list(env), list(env.values()))
    state = _State(pipe, graphs, stage_params, list(params.values()), slices, ends)
    state.gathered = [flat[k][0][idx] for k, idx in diff]
    outs = _PipelineOutput.apply(state, *params.values(), *(s[3] for s in slices))
    leaves = [[x.detach() if isinstance(x, torch.Tensor) else x for x in ls] for ls, _ in flat]
    for (k, idx), out in zip(diff, outs, strict=True):
        leaves[k][idx] = out
    return [pytree.tree_unflatten(ls, spec) for ls, (_, spec) in zip(leaves, flat, strict=True)]


class _PipelineOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, state: _State, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.state = state
        # An output the loss does not use gets None, not zeros: parameters that only feed it
        # keep grad None, as with autograd (optimizers skip them, weight decay included).
        ctx.set_materialize_grads(False)
        return tuple(leaf.detach() for leaf in state.gathered)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        state = ctx.state
        if state is None:
            raise RuntimeError(
                "the pipelined backward of this output already ran (each forward allows one "
                "backward): use backward='autograd' for retain_graph or repeated backward"
            )
        ctx.state = None
        return (None, *state.backward(grads))


class _State:
    def __init__(
        self,
        pipe: Pipeline,
        graphs: StageGraphs,
        stage_params: list[list[torch.Tensor]],
        params: list[torch.Tensor],
        slices: list[tuple[int, str, int, torch.Tensor]],
        ends: list[list[Any]],
    ) -> None:
        self.pipe, self.graphs = pipe, graphs
        self.stage_params, self.params, self.slices = stage_params, params, slices
        self.ends = ends
        self.gathered: list[torch.Tensor] = []
        self.m, self.n = len(ends), len(pipe.stages)
        # pending[(i, name)]: summed gradients of value ``name`` of micro-batch i, per leaf
        self.pending: dict[tuple[int, str], list[torch.Tensor | None]] = {}
        # stage_grads[j][id(p)]: parameter p's gradient summed over stage j's tasks so far
        self.stage_grads: list[dict[int, torch.Tensor]] = [{} for _ in stage_params]
        # owned[j]: the keys of stage_grads[j] whose tensor the pipeline made
        # (runtime.grads.accumulate)
        self.owned: list[set[int]] = [set() for _ in stage_params]
        # wrt[(i, j)]: the input leaves task (i, j) differentiates, as (name, leaf index, leaf)
        self.wrt: dict[tuple[int, int], list[tuple[str, int, torch.Tensor]]] = {}
        self.done: set[tuple[int, int]] = set()  # the backward tasks (i, j) that finished

    def add(self, i: int, name: str, grads: Sequence[torch.Tensor | None]) -> None:
        have = self.pending.get((i, name))
        if have is None:
            self.pending[(i, name)] = list(grads)
            return
        for k, g in enumerate(grads):
            before = have[k]
            if g is not None:
                have[k] = g if before is None else before + g

    def backward(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        route = self.pipe._route
        used = [(out, g) for out, g in zip(self.gathered, grads, strict=True) if g is not None]
        # 1. The output gradient per micro-batch, through gather and the reducer.
        flat = [
            (i, k, idx, leaf)
            for i, piece in enumerate(self.ends)
            for k, value in enumerate(piece)
            for idx, leaf in enumerate(tree_leaves(value))
            if wants_grad(leaf)
        ]
        per_mb: Sequence[torch.Tensor | None] = [None] * len(flat)
        if used:
            per_mb = torch.autograd.grad(
                [out for out, _ in used],
                [leaf for *_, leaf in flat],
                [g for _, g in used],
                allow_unused=True,
            )
        for (i, k, idx, _), g in zip(flat, per_mb, strict=True):
            name = route.output_leaves[k]
            if isinstance(name, str) and g is not None:
                full: list[torch.Tensor | None] = [None] * len(tree_leaves(self.ends[i][k]))
                full[idx] = g
                self.add(i, name, full)
        self.ends = []
        # 2. The stages' backward in reverse clock cycles, one worker per stage.
        self._run_stages()
        # 3. Gradients of the Function's inputs: parameters, then the caller's slices.
        param_grads, _ = sum_stages(self.stage_grads, self.stage_params)
        self.stage_grads = []
        out: list[torch.Tensor | None] = [param_grads.get(id(p)) for p in self.params]
        for i, name, k, _ in self.slices:
            got = self.pending.get((i, name))
            out.append(None if got is None else got[k])
        self.pending.clear()
        return out

    def _run_stages(self) -> None:
        pipe = self.pipe
        is_cpu = [d.type == "cpu" for d in pipe.devices]
        threads = None
        if pipe.threads_option is None:
            # The backward schedule is the forward's with the stages reversed.
            table = cycle_threads(is_cpu[::-1], self.m, available_cores())
            threads = [[row[self.n - 1 - j] for j in range(self.n)] for row in table]
        specs = [
            WorkerSpec(d, s, t)
            for d, s, t in zip(pipe.devices, pipe._streams, pipe._threads, strict=True)
        ]
        with spawn_workers(specs, name="modelsplit-backward", join_timeout=pipe.stage_timeout) as (
            in_queues,
            out_queue,
            _,
        ):
            for cycle in backward_cycles(self.m, self.n):
                for i, j in cycle:
                    for k in range(j + 1, self.n):
                        self._wait_for(out_queue, i, k)
                    count = None if threads is None else threads[i][j]
                    in_queues[j].put(Task(i, j, self._task(i, j), count))
            for i in range(self.m):
                self._wait_for(out_queue, i, 0)

    def _wait_for(self, out_queue: OutQueue, i: int, j: int) -> None:
        """Take results until task (i, j) is done. As in forward, past ``stage_timeout``
        with no result, stage j, whose earlier micro-batches all ran, is the one not
        answering: a `StageError` wrapping `StageTimeout` (its thread is left behind)."""
        timeout = self.pipe.stage_timeout
        while (i, j) not in self.done:
            try:
                ok, (task, payload) = out_queue.get(timeout=timeout)
            except queue.Empty:
                late = min(k for k in range(i + 1) if (k, j) not in self.done)
                device = str(self.pipe.devices[j])
                timed_out = StageTimeout(device, f"no answer within {timeout}s in backward")
                raise StageError(j, device, late, timed_out) from timed_out
            if not ok:
                if payload is None:  # skipped while stopping
                    continue
                if not isinstance(payload, Exception):  # KeyboardInterrupt: as is
                    raise payload
                device = str(self.pipe.devices[task.j])
                raise StageError(task.j, device, task.i, payload) from payload
            self._receive(task.i, task.j, payload)
            self.done.add((task.i, task.j))

    def _task(self, i: int, j: int) -> Any:
        route = self.pipe._route
        outputs = self.graphs.outputs[i][j]
        tensors: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for name, value in zip(route.stage_outputs[j], outputs, strict=True):
            got = self.pending.pop((i, name), None)
            if got is None:
                continue
            for leaf, g in zip(tree_leaves(value), got, strict=True):
                if g is not None and wants_grad(leaf):
                    tensors.append(leaf)
                    grads.append(g)
        inputs = self.graphs.inputs[i][j]
        wrt_inputs = [
            (name, k, leaf)
            for name, value in zip(route.stage_inputs[j], inputs, strict=True)
            for k, leaf in enumerate(tree_leaves(value))
            if wants_grad(leaf) and leaf.grad_fn is None
        ]
        params = self.stage_params[j]
        self.graphs.outputs[i][j] = ()
        self.graphs.inputs[i][j] = ()

        sums, owned = self.stage_grads[j], self.owned[j]
        lock = self.graphs.locks[j]

        def compute() -> list[Any]:
            wrt = [leaf for _, _, leaf in wrt_inputs] + params
            if not tensors or not wrt:
                return []
            with lock if lock is not None else contextlib.nullcontext():
                got = torch.autograd.grad(tensors, wrt, grads, allow_unused=True)
            for p, g in zip(params, got[len(wrt_inputs) :], strict=True):
                if g is not None:
                    accumulate(sums, owned, id(p), g)
            return list(got[: len(wrt_inputs)])

        self.wrt[(i, j)] = wrt_inputs
        return compute

    def _receive(self, i: int, j: int, input_grads: list[Any]) -> None:
        wrt_inputs = self.wrt.pop((i, j))
        by_name: dict[str, dict[int, torch.Tensor]] = {}
        for (name, k, _), g in zip(wrt_inputs, input_grads, strict=False):
            if g is not None:
                by_name.setdefault(name, {})[k] = g
        for name, found in by_name.items():
            layout = self.graphs.layout[(i, name)]
            grads: list[torch.Tensor | None] = [None] * len(layout)
            for k, g in found.items():
                src = layout[k]
                grads[k] = g if src is None or g.device == src else g.to(src)
            self.add(i, name, grads)
