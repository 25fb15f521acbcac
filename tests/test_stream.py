"""Streams, events and the Copy/Wait functions: no-ops on CPU, real on CUDA."""

from __future__ import annotations

import pytest
import torch

from runtime.copy import copy, wait
from runtime.stream import (
    CPUStream,
    as_device,
    current_stream,
    default_stream,
    get_device,
    is_cuda,
    new_stream,
    record_event,
    record_stream,
    use_device,
    use_stream,
    wait_event,
    wait_stream,
)

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_streams_are_the_placeholder() -> None:
    assert new_stream(CPU) is CPUStream
    assert current_stream(CPU) is CPUStream
    assert default_stream(CPU) is CPUStream
    assert not is_cuda(CPUStream)
    assert get_device(CPUStream) == CPU
    assert repr(CPUStream) == "CPUStream"


def test_cpu_functions_are_noops() -> None:
    x = torch.ones(2)
    with use_device(CPU), use_stream(CPUStream):
        wait_stream(CPUStream, CPUStream)
        record_stream(x, CPUStream)
        event = record_event(CPUStream)
        wait_event(CPUStream, event)
    assert event is None


def test_as_device_normalises() -> None:
    assert as_device("cpu:3") == CPU
    assert as_device(torch.device("cpu")) == CPU


def test_copy_and_wait_pass_gradients_on_cpu() -> None:
    x = torch.randn(3, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    a, b = copy((x * 1, y * 1), CPUStream, CPUStream)
    (c,) = wait((a,), CPUStream, CPUStream)
    (c * 2 + b * 3).sum().backward()
    assert x.grad is not None and y.grad is not None
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    assert torch.equal(y.grad, torch.full((3,), 3.0))
    assert copy((), CPUStream, CPUStream) == () and wait((), CPUStream, CPUStream) == ()


@cuda
def test_cuda_streams_are_real() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    assert as_device("cuda") == device
    stream = new_stream(device)
    assert is_cuda(stream) and get_device(stream) == device
    assert current_stream(device) == torch.cuda.current_stream(device)
    assert default_stream(device) == torch.cuda.default_stream(device)
    with use_stream(stream):
        assert torch.cuda.current_stream(device) == stream


@cuda
def test_cuda_event_orders_streams() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    producer, consumer = new_stream(device), new_stream(device)
    with use_stream(producer):
        x = torch.ones(4096, 4096, device=device)
        for _ in range(20):
            x = x * 1.0001
        event = record_event(producer)
    wait_event(consumer, event)
    with use_stream(consumer):
        record_stream(x, consumer)
        y = x.sum()
    torch.cuda.synchronize(device)
    assert y.item() == pytest.approx(4096 * 4096 * 1.0001**20, rel=1e-3)


@cuda
def test_cuda_copy_to_cpu_and_back_keeps_gradients() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(8, device=device, requires_grad=True)
    src, dst = new_stream(device), new_stream(CPU)
    with use_stream(src):
        h = x * 2
    (h,) = wait((h,), src, src, record_event(src))
    (y,) = copy((h,), src, dst)
    assert y.device == CPU
    y.sum().backward()
    torch.cuda.synchronize(device)
    assert x.grad is not None and torch.allclose(x.grad, torch.full_like(x, 2.0))
