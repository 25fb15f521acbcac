"""One training step over a schedule: `Pipeline.train_step` ([Note: training step]).

[Note: loss weighting]
``loss_fn(output_i, target_i)`` sees one micro-batch: the model's output for its rows (the
same structure as the model's: a tensor, tuple, dict...) and its rows of ``target``, which
is scattered like the inputs, and returns a scalar tensor. The step's loss is

- ``loss_reduction="mean"`` (default): ``sum_i (rows_i / B) * loss_i``. For a ``loss_fn``
  that averages over its rows (``F.mse_loss``, ``F.cross_entropy`` with their default
  reduction) that is the full batch's loss, also when the micro-batches differ in size, and
  the gradients are those of ``loss_fn(model(x), target).backward()``;
- ``loss_reduction="sum"``: ``sum_i loss_i``, for a ``loss_fn`` that sums over its rows.

- ``loss_reduction=count``, a callable ``count(target_i) -> int``: ``sum_i (n_i / N) *
  loss_i`` with ``n_i = count(target_i)`` and ``N`` their sum. For a ``loss_fn`` that
  averages over a number of items that differs between micro-batches, tokens with an
  ``ignore_index`` above all (``F.cross_entropy(..., ignore_index=-100)``, a Hugging Face
  causal LM's shifted labels), ``count`` gives that number (``lambda t: (t != -100).sum()``,
  or ``(t[:, 1:] != -100).sum()`` for shifted labels) and the step's loss and gradients are
  the full batch's. A micro-batch with no items (every label ignored) is a ValueError: its
  mean is 0/0, which no weight makes right.

Each micro-batch's gradient is taken from its weighted loss, so nothing is rescaled
afterwards. Under ``"mean"`` a mean over items that differ in number between micro-batches
is weighted by rows, not by items: give ``count`` for the exact figure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from runtime import schedule as _schedule
from runtime.checkpoint import rng_locks
from runtime.checks import check_schedule_option, check_training
from runtime.executor import Executor, LossFn
from runtime.grads import own, sum_grads, sum_stages, wants_grad
from runtime.interface import refuse_writes
from runtime.microbatch import capped, scatter, tree_leaves
from runtime.route import CALLER
from runtime.scheduling import by_caller, by_workers
from runtime.stream import current_stream, wait_event
from runtime.worker import WorkerSpec, available_cores, spawn_workers, stage_threads

if TYPE_CHECKING:
    from runtime.pipeline import Pipeline

__all__ = ["TrainRecord", "schedule_options", "train_step"]


@dataclass
class TrainRecord:
    """What the latest `Pipeline.train_step` ran: its schedule, micro-batch sizes and, per
    device, the actions its worker started, in order (``"1F0"``: stage 1, forward,
    micro-batch 0)."""

    schedule: str
    virtual_stages: int
    sizes: list[int]
    order: list[list[str]] = field(default_factory=list)


def train_step(
    pipe: Pipeline,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    target: Any,
    loss_fn: LossFn,
    schedule: str | None = None,
    virtual_stages: int | None = None,
    loss_reduction: str | Callable[[Any], Any] = "mean",
) -> torch.Tensor:
    """See `Pipeline.train_step`."""
    schedule = pipe.schedule if schedule is None else schedule
    v = pipe.virtual_stages if virtual_stages is None else virtual_stages
    k = check_schedule_option(schedule, v, pipe.devices)
    refuse_writes(pipe._route.writes, "a pipelined training step")
    _refuse(pipe, loss_fn)
    envs, targets, sizes = _scatter(pipe, args, kwargs, target)
    check_training(schedule, k, len(sizes), v, loss_reduction)
    per_device = _schedule.actions(schedule, k, len(sizes), v)
    stops = pipe._stops(len(sizes))
    locks = rng_locks(list(pipe.stages), pipe.devices, stops)
    caller = [dict(env) for env in envs]
    weights = _weights(sizes, loss_reduction, targets)
    step = Executor(pipe, per_device, envs, targets, weights, loss_fn, stops, locks)
    pipe.last_step = TrainRecord(schedule, v, list(sizes), step.order)
    _run(pipe, step, k)
    _write_grads(step)
    _caller_grads(step, caller)
    losses = [loss for loss in step.losses if loss is not None]
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total


def _refuse(pipe: Pipeline, loss_fn: Any) -> None:
    """What train_step does not do, said before anything runs."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (output, target) -> loss (got {loss_fn!r})")
    if pipe.on_failure == "replan":
        raise ValueError(
            "train_step does not re-run lost micro-batches (on_failure='replan'): use "
            "on_failure='raise', or call the pipeline and backward() yourself"
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError("train_step needs autograd: call it outside torch.inference_mode()")


def _scatter(
    pipe: Pipeline, args: Sequence[Any], kwargs: Mapping[str, Any], target: Any
) -> tuple[list[dict[str, Any]], list[Any], list[int]]:
    """The call's values and ``target`` split into the same micro-batches."""
    env = pipe._route.bind(tuple(args), dict(kwargs))
    if pipe._transfer.cpu_only:
        env, target = pipe._transfer.to_cpu((env, target))
    tree = {"inputs": env, "target": target}
    batches, sizes = scatter(tree, capped(tree, pipe.chunks, pipe.min_rows))
    return [dict(b["inputs"]) for b in batches], [b["target"] for b in batches], sizes


def _weights(
    sizes: Sequence[int], loss_reduction: str | Callable[[Any], Any], targets: Sequence[Any]
) -> list[float]:
    """Each micro-batch loss's weight ([Note: loss weighting])."""
    if callable(loss_reduction):
        sizes = [_count(loss_reduction, t, i, len(targets)) for i, t in enumerate(targets)]
    total = sum(sizes)
    if loss_reduction == "sum":
        return [1.0] * len(sizes)
    if total <= 0:
        return [1.0 / len(sizes)] * len(sizes)
    return [size / total for size in sizes]


def _count(count: Callable[[Any], Any], target: Any, i: int, m: int) -> int:
    """``count(target)`` as an int, with errors that name the micro-batch."""
    try:
        n = count(target)
        n = int(n.item()) if isinstance(n, torch.Tensor) else int(n)
    except Exception as e:
        raise ValueError(
            f"loss_reduction's count failed on micro-batch {i} of {m}'s target: {e}"
        ) from e
    if n <= 0:
        raise ValueError(
            f"micro-batch {i} of {m} has {n} items by loss_reduction's count (every label "
            f"ignored?): its mean loss is 0/0, which no weight makes the full batch's; use "
            f"fewer chunks, or a loss_fn that sums with loss_reduction='sum' and divide by "
            f"the batch's count yourself"
        )
    return n


def _run(pipe: Pipeline, step: Executor, k: int) -> None:
    """Run ``step`` on one worker per device; no worker outlives it."""
    option = pipe.threads_option
    if option is None or isinstance(option, int):
        threads = stage_threads(pipe.devices[:k], available_cores(), option)
    else:
        threads = list(pipe._threads[:k])
    specs = [WorkerSpec(pipe.devices[d], pipe._streams[d], threads[d]) for d in range(k)]
    threads_before = torch.get_num_threads()
    deferred = pipe._deferred.deferred() if pipe._deferred else contextlib.nullcontext()
    try:
        with (
            torch.enable_grad(),
            deferred,
            spawn_workers(
                specs, name="modelsplit-train", join_timeout=pipe.stage_timeout, unit="device"
            ) as (
                in_queues,
                out_queue,
                _,
            ),
        ):
            if worker_driven(pipe):
                by_workers(step, in_queues)
            else:
                by_caller(step, in_queues, out_queue)
    finally:
        # [Note: intra-op threads] in runtime/worker.py
        torch.set_num_threads(threads_before)


def worker_driven(pipe: Pipeline) -> bool:
    """Whether the workers run the schedule themselves: CPU-only pipelines ([Note:
    worker-driven steps] in `runtime.scheduling`)."""
    return bool(pipe._transfer.cpu_only)


def _write_grads(step: Executor) -> None:
    """Add the step's parameter gradients to ``.grad``, as autograd would; a parameter
    no loss reached keeps ``grad`` as it was (None stays None)."""
    for s, event in enumerate(step.last):  # CUDA: the caller's streams wait for the stages
        wait_event(current_stream(step.pipe.devices[s]), event)
    total, mine = sum_stages(step.stage_grads, step.params, step.owned)
    params = {id(p): p for group in step.params for p in group}
    with torch.no_grad():
        for key, g in total.items():
            p = params[key]
            if p.grad is None:
                p.grad = own(g, key in mine)
            else:
                p.grad.add_(g)


def _caller_grads(step: Executor, caller: list[dict[str, Any]]) -> None:
    """Send the gradients of the caller's tensors that require grad back through their
    micro-batch slices, so ``x.grad`` fills as with the unsplit model."""
    tensors: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for (i, name), parts in step.pending.items():
        if step.producer.get(name) != CALLER:
            continue
        for idx, leaf in enumerate(tree_leaves(caller[i][name])):
            g = sum_grads([c.grads[idx] for c in parts])
            if g is not None and wants_grad(leaf):
                tensors.append(leaf)
                grads.append(g if g.device == leaf.device else g.to(leaf.device))
    step.pending.clear()
    if tensors:
        torch.autograd.backward(tensors, grads)


def schedule_options(plan: Any, schedule: str | None) -> dict[str, Any]:
    """`Pipeline`'s ``schedule`` and ``virtual_stages`` for a plan: ``schedule`` if given,
    else the plan's (``plan.schedule``, ``plan.virtual_stages`` on plans that have them),
    else GPipe; V only for the schedules that take it."""
    name = schedule or getattr(plan, "schedule", None) or "gpipe"
    v = getattr(plan, "virtual_stages", None) or 1
    return {"schedule": name, "virtual_stages": 1 if name in ("gpipe", "1f1b") else v}
