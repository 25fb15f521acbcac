"""Streams and events for CUDA and CPU alike: every CUDA/CPU branch of the runtime lives here.

On a CPU (or any non-CUDA) device the stream is the `CPUStream` placeholder and every
function is a no-op, so the pipeline runs, and is tested, the same code on a laptop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch

__all__ = [
    "AbstractStream",
    "CPUStream",
    "Event",
    "as_device",
    "current_stream",
    "default_stream",
    "get_device",
    "is_cuda",
    "new_stream",
    "record_event",
    "record_stream",
    "use_device",
    "use_stream",
    "wait_event",
    "wait_stream",
]


class CPUStreamType:
    """The placeholder for a stream on a device that has none."""

    def __repr__(self) -> str:
        return "CPUStream"


# The one placeholder stream of every non-CUDA device.
CPUStream = CPUStreamType()

# Both CUDA streams and the CPU placeholder.
AbstractStream = torch.cuda.Stream | CPUStreamType

# A CUDA event recorded after some work, or None where there is nothing to wait for (CPU).
Event = torch.cuda.Event | None

Device = torch.device | str


def as_device(device: Device) -> torch.device:
    """A normalised `torch.device`: ``cuda`` gets the current index, ``cpu`` loses any index."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and device.index is not None:
        return torch.device("cpu")
    return device


def new_stream(device: torch.device) -> AbstractStream:
    """A new stream on ``device`` (the CPU placeholder off CUDA). Callers cache what they make."""
    if device.type != "cuda":
        return CPUStream
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call,unused-ignore]


def current_stream(device: torch.device) -> AbstractStream:
    """`torch.cuda.current_stream` for CPU or CUDA devices."""
    if device.type != "cuda":
        return CPUStream
    return torch.cuda.current_stream(device)


def default_stream(device: torch.device) -> AbstractStream:
    """`torch.cuda.default_stream` for CPU or CUDA devices."""
    if device.type != "cuda":
        return CPUStream
    return torch.cuda.default_stream(device)


@contextmanager
def use_device(device: torch.device) -> Iterator[None]:
    """`torch.cuda.device` for CPU or CUDA devices (the current device is thread-local)."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        yield


@contextmanager
def use_stream(stream: AbstractStream) -> Iterator[None]:
    """`torch.cuda.stream` for CPU or CUDA streams (the current stream is thread-local)."""
    if not is_cuda(stream):
        yield
        return
    with torch.cuda.stream(as_cuda(stream)):
        yield


def get_device(stream: AbstractStream) -> torch.device:
    """The device of a CPU or CUDA stream."""
    if is_cuda(stream):
        return as_cuda(stream).device
    return torch.device("cpu")


def wait_stream(source: AbstractStream, target: AbstractStream) -> None:
    """Make ``source`` wait for the work queued on ``target`` so far.

    A CUDA stream waits on the device; the CPU waits for a CUDA stream by synchronising
    it; nothing waits for the CPU, whose work is done when the host call returns.
    """
    if not is_cuda(target):
        return
    if is_cuda(source):
        as_cuda(source).wait_stream(as_cuda(target))
    else:
        as_cuda(target).synchronize()


def record_event(stream: AbstractStream) -> Event:
    """An event marking the work queued on ``stream`` so far (None on CPU)."""
    if not is_cuda(stream):
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call,unused-ignore]
    event.record(as_cuda(stream))
    return event


def wait_event(stream: AbstractStream, event: Event) -> None:
    """Make ``stream`` wait for ``event``; on CPU, block the host until it has happened."""
    if event is None:
        return
    if is_cuda(stream):
        as_cuda(stream).wait_event(event)
    else:
        event.synchronize()


def record_stream(tensor: Any, stream: AbstractStream) -> None:
    """`torch.Tensor.record_stream` for CUDA tensors used on another stream; else nothing.

    The caching allocator reuses a freed block only on the stream that allocated it, so
    a tensor read on another stream must be recorded there, or a later allocation could
    overwrite it before the reading kernel has run.
    """
    if is_cuda(stream) and isinstance(tensor, torch.Tensor) and tensor.is_cuda:
        tensor.record_stream(as_cuda(stream))


def is_cuda(stream: AbstractStream) -> bool:
    """True for a real CUDA stream, False for the CPU placeholder."""
    return stream is not CPUStream


def as_cuda(stream: AbstractStream) -> torch.cuda.Stream:
    """Cast to `torch.cuda.Stream` (for the type checker only)."""
    return cast(torch.cuda.Stream, stream)
