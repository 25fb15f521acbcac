"""Fault tolerance: lose a device mid-run, re-plan on the survivors, lose no micro-batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter
from partitioner.examples import MLP
from partitioner.planner.cost import DeviceSpec, fmt_bytes
from partitioner.replan import HostCopy, StateDictSource, lost_tensors, replan_plan
from runtime import Pipeline, StageError
from runtime.recovery.drill import inject_failure
from runtime.recovery.faults import (
    DeviceFailure,
    RecoveryError,
    StageTimeout,
    is_device_failure,
)
from runtime.recovery.resume import last_recovery

CHUNKS = 4
DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


@pytest.fixture(scope="module")
def shared() -> tuple[MLP, ModelSplitter, torch.Tensor]:
    """One traced, profiled and planned splitter for the whole file (solving costs time)."""
    torch.manual_seed(0)
    model = MLP(32, 8)
    x = torch.randn(16, 32)
    splitter = ModelSplitter(
        model,
        4,
        chunks=CHUNKS,
        example_inputs=(x,),
        time_limit=2,
        on_failure="replan",
        cost="flops",
        bandwidth=1e15,  # free transfers: the split follows the compute
    )
    assert splitter.devices == DEVICES
    return model, splitter, x


@pytest.fixture
def split(shared: tuple[MLP, ModelSplitter, torch.Tensor]) -> Iterator[ModelSplitter]:
    """The shared splitter on all four devices again, and no thread left behind after."""
    model, splitter, x = shared
    splitter.revive()
    splitter.recoveries.clear()
    model.zero_grad()
    before = threading.active_count()
    yield splitter
    splitter.revive()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before


@pytest.mark.parametrize("microbatch", [0, 1, CHUNKS - 1], ids=["first", "middle", "last"])
@pytest.mark.parametrize("stage", range(4))
def test_every_stage_and_microbatch_recovers(
    shared: tuple[MLP, ModelSplitter, torch.Tensor],
    split: ModelSplitter,
    stage: int,
    microbatch: int,
) -> None:
    model, _, x = shared
    with torch.no_grad():
        expected = model(x)
        with inject_failure(split, stage=stage, microbatch=microbatch) as dead:
            out = split(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert dead == DEVICES[stage]
    assert split.failed_devices == [dead]
    assert dead not in split.devices and split.plan is not None
    # Exactly the micro-batches that had not completed ran again.
    (record,) = split.recoveries
    (failure,) = record.failures
    assert (failure.device, failure.stage, failure.microbatch) == (dead, stage, microbatch)
    completed = set(failure.error.completed)
    assert record.rerun == [i for i in range(CHUNKS) if i not in completed]
    # Later calls use the new plan and need no recovery.
    with torch.no_grad():
        torch.testing.assert_close(split(x), expected, rtol=0, atol=0)
    assert len(split.recoveries) == 1


def test_only_unfinished_microbatches_rerun(
    shared: tuple[MLP, ModelSplitter, torch.Tensor], split: ModelSplitter
) -> None:
    # The last stage meets micro-batch 3 after finishing 0, 1 and 2, in order.
    with torch.no_grad(), inject_failure(split, stage=3, microbatch=3):
        split(shared[2])
    assert split.recoveries[0].rerun == [3]


def test_failures_cascade_down_to_one_device(
    shared: tuple[MLP, ModelSplitter, torch.Tensor], split: ModelSplitter
) -> None:
    model, _, x = shared
    with (
        torch.no_grad(),
        inject_failure(split, stage=0, microbatch=1),
        inject_failure(split, stage=1, microbatch=0),
        inject_failure(split, stage=3, microbatch=0),
    ):
        out = split(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert sorted(split.failed_devices) == ["cpu:0", "cpu:1", "cpu:3"]
    assert split.devices == ["cpu:2"]
    assert len(split.recoveries[0].failures) == 3


def test_last_device_failing_is_a_clear_error(
    shared: tuple[MLP, ModelSplitter, torch.Tensor], split: ModelSplitter
) -> None:
    with (
        pytest.raises(
            RecoveryError,
            match=r"every device failed .*B of weights and .*B of activations per micro-batch",
        ) as info,
        torch.no_grad(),
        inject_failure(split, stage=0, microbatch=0),
        inject_failure(split, stage=1, microbatch=0),
        inject_failure(split, stage=2, microbatch=0),
        inject_failure(split, stage=3, microbatch=0),
    ):
        split(shared[2])
    assert sorted(info.value.failed_devices) == DEVICES
    assert all(d in str(info.value) for d in DEVICES)
    assert isinstance(info.value.__cause__, StageError)


def test_model_that_no_longer_fits_the_survivors(
    split: ModelSplitter,
) -> None:
    compiled = split.__dict__["_current"]
    opts = split.__dict__["_opts"]
    # What the current plan needs per device (a training plan: weights and the schedule's
    # micro-batches in flight), with a little room: four devices fit, one cannot.
    free = replan_plan(compiled.graph, compiled.plan, [DeviceSpec(d) for d in DEVICES], [], opts)
    assert free.peak_memory is not None
    each = int(1.05 * max(free.peak_memory))
    offered = [DeviceSpec(name, memory=each) for name in DEVICES]
    replan_plan(compiled.graph, compiled.plan, offered, [], opts)  # four devices fit
    with pytest.raises(
        RecoveryError,
        match=rf"losing cpu:1, cpu:2, cpu:3 the model no longer fits.*over the {fmt_bytes(each)}",
    ):
        replan_plan(compiled.graph, compiled.plan, offered, DEVICES[1:], opts)


@pytest.mark.parametrize("stage,microbatch", [(0, 0), (2, 1), (3, 3)])
def test_training_gradients_equal_the_unsplit_model(
    shared: tuple[MLP, ModelSplitter, torch.Tensor],
    split: ModelSplitter,
    stage: int,
    microbatch: int,
) -> None:
    model, _, x = shared
    model(x).pow(2).mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with inject_failure(split, stage=stage, microbatch=microbatch):
        split(x).pow(2).mean().backward()
    assert split.failed_devices == [DEVICES[stage]]
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


class _Bug(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x32 and 16x32)"),
        ValueError("a bug in the model"),
        RuntimeError("CUDA error: device-side assert triggered"),
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
    ids=["shape", "bug", "device-assert", "oom"],
)
def test_user_error_is_raised_without_replanning(
    shared: tuple[MLP, ModelSplitter, torch.Tensor], split: ModelSplitter, error: Exception
) -> None:
    plan = split.plan

    def hook(i: int, j: int) -> None:
        if (i, j) == (1, 2):
            raise error

    split.pipeline.on_task = hook
    try:
        with pytest.raises(StageError) as info, torch.no_grad():
            split(shared[2])
    finally:
        split.pipeline.on_task = None
    assert info.value.original is error and (info.value.stage, info.value.microbatch) == (2, 1)
    assert split.failed_devices == [] and split.plan is plan and split.recoveries == []


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: unspecified launch failure",
        "CUDA error: uncorrectable ECC error encountered",
        "CUDA error: unknown error",
    ],
)
def test_lost_device_cuda_errors_count_as_device_failures(message: str) -> None:
    assert is_device_failure(RuntimeError(message))
    assert is_device_failure(StageError(1, "cuda:1", 0, RuntimeError(message)))
    assert is_device_failure(DeviceFailure("cuda:3"))
    assert not is_device_failure(RuntimeError("expected scalar type Float but found Half"))


def _stages() -> list[nn.Module]:
    return [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)]


def test_bare_pipeline_moves_the_failed_stage_to_a_neighbour() -> None:
    stages = _stages()
    x = torch.randn(10, 8)
    with torch.no_grad():
        pipe = Pipeline(stages, ["cpu"] * 3, chunks=4, on_failure="replan")
        # Bit for bit what the pipeline gives with no failure: the same micro-batches (a
        # GEMM over 3 rows may round differently from one over 10 on some CPUs).
        expected = pipe(x)
        torch.testing.assert_close(expected, nn.Sequential(*stages)(x))
        with inject_failure(pipe, stage=1, microbatch=2):
            torch.testing.assert_close(pipe(x), expected, rtol=0, atol=0)
        record = last_recovery(pipe)
        assert record is not None and record.failures[0].device == "cpu:1"
        torch.testing.assert_close(pipe(x), expected, rtol=0, atol=0)  # on the new devices
        with (
            pytest.raises(RecoveryError, match="every device of the pipeline failed"),
            inject_failure(pipe, stage=0, microbatch=0),
            inject_failure(pipe, stage=2, microbatch=0),
        ):
            pipe(x)


def test_bare_pipeline_raises_by_default() -> None:
    pipe = Pipeline(_stages(), ["cpu"] * 3, chunks=2)
    with pytest.raises(StageError) as info, inject_failure(pipe, stage=2, microbatch=1):
        pipe(torch.randn(4, 8))
    assert isinstance(info.value.original, DeviceFailure)
    assert (info.value.stage, info.value.microbatch) == (2, 1)


def test_a_worker_that_does_not_answer_times_out_and_is_replanned() -> None:
    before = threading.active_count()
    stages = _stages()
    x = torch.randn(8, 8)
    pipe = Pipeline(stages, ["cpu"] * 3, chunks=4, on_failure="replan", stage_timeout=0.5)
    with torch.no_grad(), inject_failure(pipe, stage=1, microbatch=1, hang=1.5):
        out = pipe(x)
        # the same micro-batches as the model run chunk by chunk: bit for bit
        chunked = torch.cat([nn.Sequential(*stages)(c) for c in x.tensor_split(4)])
        torch.testing.assert_close(out, chunked, rtol=0, atol=0)
    record = last_recovery(pipe)
    assert record is not None
    assert isinstance(record.failures[0].error.original, StageTimeout)
    deadline = time.monotonic() + 5  # the hung worker stops once it wakes up
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before


def test_state_dict_source_restores_lost_weights(tmp_path: Path) -> None:
    model = nn.Linear(4, 4)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    StateDictSource(str(path)).restore([("weight", model.weight)])
    assert torch.equal(model.weight, saved)
    with pytest.raises(RecoveryError, match="no 'missing'"):
        StateDictSource(str(path)).restore([("missing", model.bias)])
    assert lost_tensors(model, "cpu:1") == []  # host memory survives a CPU worker


def test_host_copy_follows_updates_and_restores_lost_weights() -> None:
    model = nn.Linear(4, 4)
    host = HostCopy(include_cpu=True)  # CPU tensors stand in for a GPU's here
    host.refresh(model)
    assert host.nbytes == sum(p.numel() * 4 for p in model.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)  # an optimizer step: the version moves, the copy follows
    host.refresh(model)
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    host.restore([("weight", model.weight)])
    assert torch.equal(model.weight, saved)
    assert HostCopy().nbytes == 0


def test_inject_failure_needs_a_planned_splitter() -> None:
    lazy = ModelSplitter(nn.Linear(2, 2), 2)
    with (
        pytest.raises(ValueError, match="plan it first"),
        inject_failure(lazy, stage=0, microbatch=0),
    ):
        pass
    with pytest.raises(ValueError, match="recovery='state-dict' needs state_dict_path"):
        ModelSplitter(nn.Linear(2, 2), 2, on_failure="replan", recovery="state-dict")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lost_gpu_weights_come_back_from_the_host_copy() -> None:
    model = MLP(32, 4)
    x = torch.randn(8, 32)
    with torch.no_grad():
        expected = model(x)
    split = ModelSplitter(
        model,
        devices=["cuda:0", "cpu"],
        chunks=4,
        example_inputs=(x,),
        time_limit=2,
        on_failure="replan",
        cost="flops",
        bandwidth=1e15,
    )
    assert split.devices[0] == "cuda:0"
    with torch.no_grad(), inject_failure(split, stage=0, microbatch=1):
        out = split(x)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-5)
    assert split.failed_devices == ["cuda:0"] and split.devices == ["cpu:1"]
    assert all(p.device.type == "cpu" for p in model.parameters())
