"""Device checks in autograd's backward, and the failures they find kept for the next call.

[Note: a device lost in backward]
With ``backward="autograd"`` the stages' backward runs inside autograd's engine, after the
call has returned: no worker of the pipeline runs it, so no ``on_task`` hook can see it,
and an exception raised there reaches only the caller of ``loss.backward()``. So that a
device lost there is still known:

- when ``Pipeline.on_backward`` is set, each (micro-batch i, stage j) task's outputs pass
  through `BackwardGate`, an identity whose backward runs ``on_backward(i, j)`` as stage j
  starts micro-batch i's backward (the fire drill's ``phase="backward"`` and users' own
  health checks hang here);
- a device failure raised there (`runtime.recovery.faults.is_device_failure`) is recorded on
  the pipeline (`record_lost`, and the pipeline's ``on_lost`` callback: ModelSplitter adds
  the device to ``failed_devices`` at once) and raised as a `StageError` naming the stage,
  device and micro-batch;
- the next call of a pipeline with ``on_failure="replan"`` re-plans off every recorded
  device before it runs (`runtime.recovery.resume`): the step that failed is the caller's to
  repeat, on the new plan.

A lost GPU needs no gate: its context is gone, so the next call's first task on it fails
with a lost-device CUDA error and the call re-plans as any failure in forward does. Without
``on_backward`` set the gate is not there: no cost on the normal path.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from runtime.errors import StageError
from runtime.recovery.faults import device_names, is_device_failure

__all__ = ["BackwardGate", "gate", "record_lost", "take_lost"]

_lock = threading.Lock()


class BackwardGate(torch.autograd.Function):
    """Identity on a task's output tensors; its backward runs ``pipe.on_backward(i, j)``."""

    @staticmethod
    def forward(ctx: Any, pipe: Any, i: int, j: int, *tensors: torch.Tensor) -> Any:
        ctx.pipe, ctx.i, ctx.j = pipe, i, j
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        check(ctx.pipe, ctx.i, ctx.j)
        return (None, None, None, *grads)


def check(pipe: Any, i: int, j: int) -> None:
    """Run ``pipe.on_backward(i, j)``; what it raises becomes a `StageError`, and a device
    failure is recorded first ([Note: a device lost in backward])."""
    hook = pipe.on_backward
    if hook is None:
        return
    try:
        hook(i, j)
    except Exception as exc:
        name = device_names(pipe)[j]
        if is_device_failure(exc):
            record_lost(pipe, name)
        raise StageError(j, name, i, exc) from exc


def gate(pipe: Any, i: int, j: int, outputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Task (i, j)'s outputs, the tensors that need a gradient passed through `BackwardGate`
    (only when ``pipe.on_backward`` is set, autograd records, and ``backward="autograd"``:
    the pipelined backward runs each task's backward as a task of its own)."""
    if pipe.on_backward is None or pipe.backward != "autograd" or not torch.is_grad_enabled():
        return outputs
    where = [k for k, v in enumerate(outputs) if isinstance(v, torch.Tensor) and v.requires_grad]
    if not where:
        return outputs
    gated = BackwardGate.apply(pipe, i, j, *(outputs[k] for k in where))
    out = list(outputs)
    for k, value in zip(where, gated, strict=True):
        out[k] = value
    return tuple(out)


def record_lost(pipe: Any, name: str) -> None:
    """Book device ``name`` of ``pipe`` as lost, for its next call to re-plan off."""
    with _lock:
        lost = pipe.__dict__.setdefault("lost_in_backward", [])
        if name not in lost:
            lost.append(name)
    on_lost = pipe.__dict__.get("on_lost")
    if on_lost is not None:
        on_lost(name)


def take_lost(pipe: Any) -> list[str]:
    """The devices of ``pipe`` lost in backward since the last look, in order; clears them."""
    with _lock:
        lost = pipe.__dict__.get("lost_in_backward") or []
        pipe.__dict__["lost_in_backward"] = []
    return list(lost)
