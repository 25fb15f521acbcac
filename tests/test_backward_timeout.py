"""``stage_timeout`` in the pipelined backward (issue 12.3): a stalled stage is a StageError."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from runtime import Pipeline, StageError
from runtime.recovery.faults import StageTimeout


class _StallsInBackward(nn.Module):
    """Stage whose backward of micro-batch ``at`` blocks until ``release`` is set (or 10 s)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.at = at
        self.calls = 0
        self.release = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.calls == self.at:
            y.register_hook(lambda g: (self.release.wait(10), g)[1])
        self.calls += 1
        return y


def test_stalled_backward_is_a_stage_timeout_naming_stage_and_microbatch() -> None:
    torch.manual_seed(0)
    stalls = _StallsInBackward(at=1)
    stages = [nn.Linear(8, 8), stalls, nn.Linear(8, 2)]
    before = threading.active_count()
    pipe = Pipeline(stages, ["cpu"] * 3, chunks=3, stage_timeout=0.5, backward="pipelined")
    loss = pipe(torch.randn(6, 8)).sum()
    start = time.monotonic()
    try:
        with pytest.raises(StageError, match="stage 1 on cpu failed on micro-batch 1") as info:
            loss.backward()
        # 0.5 s for the missing result, at most 0.5 s more to join the stalled worker
        assert time.monotonic() - start < 5
        assert isinstance(info.value.original, StageTimeout)
        assert "within 0.5s" in str(info.value)
    finally:
        stalls.release.set()
    # The stalled worker finishes its task, skips the rest and stops: no thread is left.
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before


def test_slow_but_answering_stages_are_not_timed_out() -> None:
    # The timeout bounds the wait for one result, not the whole backward.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    pipe = Pipeline(
        [model[:2], model[2:]], ["cpu"] * 2, chunks=4, stage_timeout=5.0, backward="pipelined"
    )
    x = torch.randn(8, 8)
    pipe(x).pow(2).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    model(x).pow(2).sum().backward()
    for a, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
