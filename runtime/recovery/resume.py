"""Survive a lost device: re-plan, then re-run only the micro-batches that did not complete.

[Note: resuming a call]
`Pipeline(on_failure="replan")` sends each call here. The call runs as usual; if a stage
fails with a device failure (`runtime.recovery.faults.is_device_failure`):

1. the pipeline has already stopped and joined its workers (`Pipeline.run`);
2. ``replan(pipeline, failure)`` returns the pipeline to go on with. ModelSplitter passes
   its own (re-solve on the surviving devices, re-split, re-place the weights); a bare
   Pipeline moves the failed stage onto a surviving neighbour's device (`move_off`);
3. the micro-batches whose outputs are not complete run again on the new pipeline, as one
   call over exactly their rows, split into exactly the same micro-batches (a subsequence
   of `torch.tensor_split`'s sizes is still in its order, so re-splitting their rows gives
   the same pieces); a failure there re-plans again, down to the last device;
4. outputs are gathered in micro-batch order, and later calls go to the new pipeline.

A completed micro-batch is kept unless part of it lived in the failed device's memory: its
output tensors, or (when autograd recorded a graph for it) the activations that backward
needs, which every micro-batch left on every stage. A CPU worker's memory is the host's and
survives; an accelerator's is gone. So with a lost GPU, a training call re-runs every
micro-batch and an inference call keeps the outputs that had reached another device.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.errors import StageError
from runtime.interface import refuse_writes
from runtime.microbatch import bound, gather, tree_leaves, tree_map
from runtime.recovery.faults import (
    DeviceFailure,
    RecoveryError,
    device_names,
    is_device_failure,
    lost_memory,
    rebind_hook,
)
from runtime.recovery.watch import take_lost

__all__ = ["Failure", "Recovery", "last_recovery", "latest", "move_off", "resume"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """A device failure met during a call: where, and every device lost so far."""

    device: str
    stage: int
    microbatch: int
    error: StageError
    failed: tuple[str, ...]


@dataclass
class Recovery:
    """What a call went through: its failures, the micro-batches run again, and times."""

    failures: list[Failure] = field(default_factory=list)
    rerun: list[int] = field(default_factory=list)
    replan_s: float = 0.0
    total_s: float = 0.0


# A pipeline that was replaced, to the one that replaced it; and each call's Recovery.
_successor: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
#: per thread: {pipeline: the Recovery of that thread's latest call of it}
_local = threading.local()


def latest(pipe: Any) -> Any:
    """The pipeline that now stands in for ``pipe`` (``pipe`` itself if none replaced it)."""
    while pipe in _successor:
        pipe = _successor[pipe]
    return pipe


def last_recovery(pipe: Any) -> Recovery | None:
    """The `Recovery` of this thread's latest call of ``pipe``, or None if that call met no
    failure (each thread sees its own calls: concurrent calls do not mix their records)."""
    return _recoveries().get(pipe)


def _recoveries() -> weakref.WeakKeyDictionary[Any, Recovery]:
    records = getattr(_local, "recoveries", None)
    if records is None:
        records = _local.recoveries = weakref.WeakKeyDictionary()
    return records


def resume(pipe: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``pipe(*args, **kwargs)`` surviving device failures; see [Note: resuming a call]."""
    records = _recoveries()
    records.pop(pipe, None)
    t0 = time.perf_counter()
    early = Recovery()
    current = _off_lost(latest(pipe), early)
    try:
        out = current.run_call(args, kwargs)[0]
    except StageError as err:
        if not is_device_failure(err):
            raise
        try:
            refuse_writes(
                getattr(getattr(current, "_route", None), "writes", ()),
                "resuming a call after a lost device",
            )
        except ValueError as exc:
            raise exc from err
        error = err
    else:
        if early.failures:
            early.total_s = time.perf_counter() - t0
            records[pipe] = early
        return out
    call = _Call(list(error.sizes))  # this call's own: another thread may be running too
    call.record.failures.extend(early.failures)
    call.record.replan_s = early.replan_s
    call.failed.extend(f.device for f in early.failures)
    while True:
        failure = call.lose(error, device_names(current)[error.stage])
        current = _replan(current, failure, call.record)
        try:
            call.done.update(_rerun(current, args, kwargs, call.sizes, call.lost))
            break
        except StageError as err:
            if not is_device_failure(err):
                raise
            error = err
    call.record.rerun = sorted(call.rerun)
    call.record.total_s = time.perf_counter() - t0
    records[pipe] = call.record
    log.warning(
        "recovered from %s in %.3fs (re-plan %.3fs): re-ran micro-batches %s of %s on %s",
        ", ".join(call.failed),
        call.record.total_s,
        call.record.replan_s,
        call.record.rerun,
        len(call.sizes),
        ", ".join(device_names(current)),
    )
    reducer = bound(pipe.reducer, args, kwargs, len(call.sizes))
    return gather([call.done[i] for i in range(len(call.sizes))], call.sizes, reducer)


@dataclass
class _Call:
    """What one recovering call knows: its micro-batches, those done, those lost."""

    sizes: list[int]
    done: dict[int, Any] = field(default_factory=dict)
    record: Recovery = field(default_factory=lambda: Recovery())
    failed: list[str] = field(default_factory=list)
    rerun: set[int] = field(default_factory=set)
    lost: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lost = list(range(len(self.sizes)))

    def lose(self, error: StageError, name: str) -> Failure:
        """Book ``error`` on device ``name``: what survives it, what must run again."""
        self.failed.append(name)
        lost = self.lost
        where = lost[error.microbatch] if error.microbatch < len(lost) else error.microbatch
        self.done = {i: out for i, out in self.done.items() if _survives(out, name)}
        completed = error.completed.items()
        self.done.update({lost[k]: out for k, out in completed if _survives(out, name)})
        self.lost = [i for i in range(len(self.sizes)) if i not in self.done]
        self.rerun.update(self.lost)
        failure = Failure(name, error.stage, where, error, tuple(self.failed))
        self.record.failures.append(failure)
        log.warning(
            "%s failed at stage %s, micro-batch %s (%s); re-planning",
            name,
            error.stage,
            failure.microbatch,
            error.original,
        )
        return failure


def _off_lost(current: Any, record: Recovery) -> Any:
    """``current``, re-planned off the devices an earlier call lost in autograd's backward
    ([Note: a device lost in backward] in `runtime.recovery.watch`)."""
    failed: list[str] = []
    for name in take_lost(current):
        names = device_names(current)
        if name not in names:
            continue  # another call re-planned off it already
        j = names.index(name)
        failed.append(name)
        error = StageError(j, name, 0, DeviceFailure(name, "lost during backward"))
        log.warning("%s was lost during backward (stage %s); re-planning", name, j)
        failure = Failure(name, j, 0, error, tuple(failed))
        record.failures.append(failure)
        current = _replan(current, failure, record)
    return current


def _replan(current: Any, failure: Failure, record: Recovery) -> Any:
    t = time.perf_counter()
    replan: Callable[[Any, Failure], Any] = current.replan or move_off
    try:
        new = replan(current, failure)
    except RecoveryError as exc:
        if exc.__cause__ is None:
            exc.__cause__ = failure.error
        raise
    if new.on_task is None and current.on_task is not None:
        new.on_task = rebind_hook(current.on_task, new)
    if getattr(new, "on_backward", None) is None and getattr(current, "on_backward", None):
        new.on_backward = rebind_hook(current.on_backward, new)
    if new is not current:
        _successor[current] = new
    record.replan_s += time.perf_counter() - t
    return new


def _survives(output: Any, failed: str) -> bool:
    """Whether a completed output outlives ``failed``: see [Note: resuming a call]."""
    dead = lost_memory(failed)
    if dead is None:
        return True
    tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
    return not any(t.device == dead or t.grad_fn is not None for t in tensors)


class _PerMicrobatch:
    """A reducer's stand-in that keeps each micro-batch's value apart."""

    def __init__(self, values: list[Any]) -> None:
        self.values = values


def _rows(sizes: Sequence[int], lost: Sequence[int]) -> Callable[[Any], Any]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    spans = [(starts[i], starts[i] + sizes[i]) for i in lost]
    contiguous = all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))

    def take(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            return leaf
        if contiguous:
            return leaf[spans[0][0] : spans[-1][1]]
        return torch.cat([leaf[a:b] for a, b in spans])

    return take


def _rerun(
    pipe: Any, args: Sequence[Any], kwargs: dict[str, Any], sizes: list[int], lost: list[int]
) -> dict[int, Any]:
    """Run micro-batches ``lost`` on ``pipe``: {micro-batch: its own output}."""
    if sizes == [0]:  # nothing batched: the call was one micro-batch
        return {0: pipe.run_call(args, kwargs)[0]}
    sub_args, sub_kwargs = tree_map(_rows(sizes, lost), (tuple(args), dict(kwargs)))
    out, run = pipe.run_call(sub_args, sub_kwargs, chunks=len(lost), reducer=_PerMicrobatch)
    want = [sizes[i] for i in lost]
    if run.sizes != want:
        raise RuntimeError(f"re-run split into {run.sizes}, expected {want}")
    return {i: _piece(out, want, k) for k, i in enumerate(lost)}


def _piece(out: Any, sizes: list[int], k: int) -> Any:
    start = sum(sizes[:k])

    def take(leaf: Any) -> Any:
        if isinstance(leaf, _PerMicrobatch):
            return leaf.values[k]
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf[start : start + sizes[k]]
        return leaf

    return tree_map(take, out)


def move_off(pipe: Any, failure: Failure) -> Any:
    """The default re-plan of a bare Pipeline: every stage on a failed device moves onto the
    device of its nearest surviving stage (the one before it if equally near).

    Stage modules stay as they are; their weights move with them (``.to``), which works for
    CPU workers and for devices whose memory can still be read (a timeout). A lost GPU's
    weights are gone: pass ``replan=`` with your own source, or use
    ``ModelSplitter(on_failure="replan")``, which keeps a host copy.
    """
    names = device_names(pipe)
    dead = set(failure.failed)
    alive = [j for j, name in enumerate(names) if name not in dead]
    if not alive:
        raise RecoveryError(
            f"every device of the pipeline failed ({', '.join(failure.failed)}); "
            f"nothing is left to re-run micro-batches on",
            list(failure.failed),
        )
    devices, new_names = list(pipe.devices), list(names)
    for j, name in enumerate(names):
        if name in dead:
            k = min(alive, key=lambda a: (abs(a - j), a))
            devices[j], new_names[j] = devices[k], names[k]
            if devices[j] != pipe.devices[j]:
                pipe.stages[j].to(devices[j])
    new = type(pipe)(
        list(pipe.stages),
        devices,
        chunks=pipe.chunks,
        checkpoint=pipe.checkpoint,
        reducer=pipe.reducer,
        threads=pipe.threads_option,
        on_failure=pipe.on_failure,
        replan=pipe.replan,
        stage_timeout=pipe.stage_timeout,
    )
    new.device_names = new_names
    log.info("moved stages off %s: %s", failure.device, ", ".join(new_names))
    return new
