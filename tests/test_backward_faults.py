"""A device lost during autograd's backward is recorded, and the next call re-plans (issue 12.4).

[Note: a device lost in backward] in `runtime.recovery.watch`.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter
from partitioner.examples import MLP
from runtime import Pipeline, StageError
from runtime.recovery.drill import inject_failure
from runtime.recovery.faults import DeviceFailure, device_names
from runtime.recovery.resume import last_recovery

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


def _splitter(model: nn.Module, x: torch.Tensor) -> ModelSplitter:
    return ModelSplitter(
        model,
        4,
        chunks=4,
        example_inputs=(x,),
        time_limit=2,
        on_failure="replan",
        cost="flops",
        bandwidth=1e15,
    )


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage,microbatch", [(0, 0), (2, 1), (3, 3)])
def test_lost_in_backward_is_recorded_and_the_next_step_replans(
    stage: int, microbatch: int
) -> None:
    torch.manual_seed(0)
    model = MLP(32, 8)
    x = torch.randn(16, 32)
    model(x).pow(2).mean().backward()
    expected = _grads(model)
    model.zero_grad()
    split = _splitter(model, x)
    assert split.devices == DEVICES
    before = threading.active_count()
    with inject_failure(split, stage=stage, microbatch=microbatch, phase="backward") as dead:
        loss = split(x).pow(2).mean()  # the forward runs: the device dies in backward
        assert split.failed_devices == []
        with pytest.raises(StageError, match=f"stage {stage} on {dead} failed") as info:
            loss.backward()
        assert isinstance(info.value.original, DeviceFailure)
        assert split.failed_devices == [dead]  # recorded at once
        # The caller repeats the step: the call re-plans off the lost device first.
        model.zero_grad()
        split(x).pow(2).mean().backward()
    assert dead not in split.plan.devices
    assert split.failed_devices == [dead]
    assert [[f.device for f in r.failures] for r in split.recoveries] == [[dead]]
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, expected[name], msg=name)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before


def test_forward_drill_does_not_fire_in_backward_and_backward_drill_not_in_forward() -> None:
    torch.manual_seed(0)
    model = MLP(32, 8)
    x = torch.randn(16, 32)
    split = _splitter(model, x)
    with inject_failure(split, stage=1, microbatch=0, phase="backward"):
        with torch.no_grad():
            torch.testing.assert_close(split(x), model(x))  # no backward, no failure
        assert split.failed_devices == []
    with inject_failure(split, stage=1, microbatch=2):
        split(x).sum().backward()  # dies in forward: re-planned within the call
    assert split.failed_devices == ["cpu:1"]


class _Check:
    """A user's health check in backward: device ``dead`` is lost from the first call on."""

    def __init__(self, names: list[str], dead: str) -> None:
        self.names, self.dead = names, dead

    def __call__(self, i: int, j: int) -> None:
        if self.names[j] == self.dead:
            raise DeviceFailure(self.dead, "ECC error seen by the health check")

    def rebind(self, pipe: Pipeline) -> _Check:
        """On the pipeline that replaced this one: the same check by its device names."""
        return _Check(device_names(pipe), self.dead)


def test_bare_pipeline_moves_off_a_device_lost_in_backward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    stages = [model[:2], model[2:4], model[4:]]
    pipe = Pipeline(stages, ["cpu"] * 3, chunks=2, on_failure="replan")
    pipe.on_backward = _Check(["cpu:0", "cpu:1", "cpu:2"], "cpu:1")
    x = torch.randn(4, 8)
    with pytest.raises(StageError, match="stage 1 on cpu:1 failed on micro-batch"):
        pipe(x).sum().backward()
    model.zero_grad()
    new = pipe(x)  # re-planned: stage 1 moved onto a neighbour
    assert last_recovery(pipe) is not None
    new.sum().backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model(x).sum().backward()
    for a, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_a_user_error_in_backward_is_raised_and_not_recorded() -> None:
    stages = [nn.Linear(4, 4), nn.Linear(4, 2)]
    pipe = Pipeline(stages, ["cpu"] * 2, chunks=2, on_failure="replan")

    def hook(i: int, j: int) -> None:
        raise ValueError("a NaN in the gradient")

    pipe.on_backward = hook
    with pytest.raises(StageError, match="ValueError: a NaN in the gradient"):
        pipe(torch.randn(4, 4)).sum().backward()
    assert pipe.__dict__.get("lost_in_backward", []) == []
    pipe.on_backward = None
    pipe(torch.randn(4, 4)).sum().backward()  # same pipeline, nothing re-planned
    assert last_recovery(pipe) is None


def test_backward_drill_refuses_the_pipelined_backward() -> None:
    stages = [nn.Linear(4, 4), nn.Linear(4, 2)]
    pipe = Pipeline(stages, ["cpu"] * 2, chunks=2, backward="pipelined")
    drill = inject_failure(pipe, stage=0, microbatch=0, phase="backward")
    with pytest.raises(ValueError, match="phase='backward' drills autograd"), drill:
        pass
