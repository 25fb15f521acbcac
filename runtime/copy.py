"""Autograd functions that move activations between streams and devices.

[Note: copy and wait]
A value produced by stage p (on its compute stream S_p) and read by stage j on another
device travels like this; everything is queued on the GPU, the host never waits::

    stage p, worker thread     main thread                          stage j, worker thread
    ----------------------     -----------------------------------  ----------------------
    [1] compute on S_p         [2] Wait: copy stream C_p waits [1]
        record event e_p       [3] Copy: x.to(device_j) on C_p/C_j
                               [4] Wait: S_j waits C_j              [5] compute on S_j

The event e_p is recorded by the worker right after [1], so [2] waits for micro-batch i
only, never for micro-batch i+1 that the worker may already have queued on S_p: the copy
of i overlaps the compute of i+1. On the same device [3] is skipped and S_j waits e_p.
Backward runs the same steps in reverse; `record_stream` keeps the caching allocator from
reusing a block while another stream may still read it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from runtime.stream import (
    AbstractStream,
    Event,
    current_stream,
    get_device,
    record_stream,
    use_stream,
    wait_event,
    wait_stream,
)

__all__ = ["Copy", "Wait", "copy", "wait"]

Tensors = tuple[Tensor, ...]


class Copy(torch.autograd.Function):
    """Copy tensors from ``prev_stream``'s device to ``next_stream``'s, on those streams."""

    @staticmethod
    def forward(
        ctx: Any, prev_stream: AbstractStream, next_stream: AbstractStream, *inputs: Tensor
    ) -> Tensors:
        ctx.prev_stream = prev_stream
        ctx.next_stream = next_stream
        device = get_device(next_stream)
        output_stream = current_stream(device)
        outputs = []
        with use_stream(prev_stream), use_stream(next_stream):
            for x in inputs:
                y = x.to(device)
                outputs.append(y)
                # x was allocated on another stream than prev_stream, which reads it [3].
                record_stream(x, prev_stream)
                # y, allocated on next_stream, is read on the stream current there.
                record_stream(y, output_stream)
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        prev_stream: AbstractStream = ctx.prev_stream
        next_stream: AbstractStream = ctx.next_stream
        device = get_device(prev_stream)
        input_stream = current_stream(device)
        grad_inputs: deque[Tensor] = deque(maxlen=len(grad_outputs))
        with use_stream(prev_stream), use_stream(next_stream):
            for g in reversed(grad_outputs):
                y = g.to(device)
                grad_inputs.appendleft(y)
                record_stream(g, next_stream)
                record_stream(y, input_stream)
        return (None, None, *grad_inputs)


class Wait(torch.autograd.Function):
    """Make ``next_stream`` wait for ``event`` (or for all of ``prev_stream``); pass tensors on."""

    @staticmethod
    def forward(
        ctx: Any,
        prev_stream: AbstractStream,
        next_stream: AbstractStream,
        event: Event,
        *inputs: Tensor,
    ) -> Tensors:
        ctx.prev_stream = prev_stream
        ctx.next_stream = next_stream
        if event is None:
            wait_stream(next_stream, prev_stream)
        else:
            wait_event(next_stream, event)
        for x in inputs:
            record_stream(x, next_stream)
        return tuple(x.detach() for x in inputs)

    @staticmethod
    def backward(ctx: Any, *grad_inputs: Tensor) -> tuple[Tensor | None, ...]:
        wait_stream(ctx.prev_stream, ctx.next_stream)
        return (None, None, None, *grad_inputs)


def copy(tensors: Tensors, prev_stream: AbstractStream, next_stream: AbstractStream) -> Tensors:
    """Step [3] of [Note: copy and wait]."""
    if not tensors:
        return tensors
    return tuple(Copy.apply(prev_stream, next_stream, *tensors))  # type: ignore[no-untyped-call,unused-ignore]


def wait(
    tensors: Tensors,
    prev_stream: AbstractStream,
    next_stream: AbstractStream,
    event: Event = None,
) -> Tensors:
    """Steps [2] and [4] of [Note: copy and wait]."""
    if not tensors:
        return tensors
    return tuple(Wait.apply(prev_stream, next_stream, event, *tensors))  # type: ignore[no-untyped-call,unused-ignore]
