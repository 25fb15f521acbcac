"""Concurrent calls of one ModelSplitter, with and without a device lost mid-call.

The promise (docs/api.md): a planned ModelSplitter may be called from several threads at
once; each call gets its own output, and with ``on_failure="replan"`` a device lost during
concurrent calls is re-planned once and every call still returns its own, exact result.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from partitioner import ModelSplitter
from runtime import inject_failure
from runtime.recovery.resume import last_recovery

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(8)))


def _calls(splitter: ModelSplitter, inputs: list[torch.Tensor]) -> list[Any]:
    """Call ``splitter`` on each input from its own thread, all at once."""
    results: list[Any] = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def call(k: int) -> None:
        start.wait()
        try:
            with torch.no_grad():
                results[k] = (splitter(inputs[k]), last_recovery(splitter.pipeline))
        except BaseException as exc:  # reported by the test, not lost in the thread
            results[k] = exc

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_concurrent_calls_get_their_own_outputs() -> None:
    model = _model()
    splitter = ModelSplitter(
        model, devices=DEVICES, chunks=4, example_inputs=(torch.randn(8, 16),)
    )
    inputs = [torch.randn(rows, 16) for rows in (32, 20, 7, 13)]
    for x, got in zip(inputs, _calls(splitter, inputs), strict=True):
        assert not isinstance(got, BaseException), got
        torch.testing.assert_close(got[0], model(x))


def test_concurrent_calls_survive_a_device_lost_under_them() -> None:
    for trial in range(4):
        model = _model()
        splitter = ModelSplitter(
            model,
            devices=DEVICES,
            chunks=4,
            on_failure="replan",
            example_inputs=(torch.randn(8, 16),),
        )
        inputs = [torch.randn(32, 16), torch.randn(20, 16), torch.randn(9, 16)]
        with inject_failure(splitter, stage=1 + trial % 3, microbatch=1) as lost:
            results = _calls(splitter, inputs)
        for x, got in zip(inputs, results, strict=True):
            assert not isinstance(got, BaseException), f"trial {trial}: {got!r}"
            assert got[0].shape == (x.shape[0], 16)
            torch.testing.assert_close(got[0], model(x))
        assert splitter.failed_devices == [lost]
        assert lost not in splitter.devices
        torch.testing.assert_close(splitter(inputs[0]), model(inputs[0]))  # the new plan
