"""`Pipeline`'s options, checked before any thread or stream is made."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from runtime import schedule as _schedule
from runtime.microbatch import REDUCERS, CountedMean, Reducer
from runtime.stream import as_device

__all__ = [
    "BACKWARD_MODES",
    "DeviceLike",
    "LOSS_REDUCTIONS",
    "check_args",
    "check_loss",
    "check_schedule_option",
    "check_training",
    "parse_device",
]

log = logging.getLogger(__name__)

DeviceLike = str | torch.device
BACKWARD_MODES = ("autograd", "pipelined")
#: how `Pipeline.train_step` weights the micro-batch losses (see [Note: loss weighting])
LOSS_REDUCTIONS = ("mean", "sum")


def parse_device(device: DeviceLike) -> torch.device:
    """``device`` as a torch device; names torch does not know are CPU workers."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        # The planner's abstract names ("dev:0" for devices=4) become CPU workers.
        log.info("device %r is not a torch device: it runs as a CPU worker", device)
        return torch.device("cpu")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} needs CUDA, which is not available here")
    return as_device(parsed)


def check_args(
    stages: Sequence[nn.Module],
    devices: Sequence[torch.device],
    chunks: int,
    reducer: Reducer | None,
    on_failure: str,
    stage_timeout: float | None,
    backward: str,
) -> None:
    """Pipeline's options, checked before any thread or stream is made."""
    if len(stages) == 0:
        raise ValueError("a pipeline needs at least one stage (got none)")
    if len(devices) != len(stages):
        raise ValueError(f"one device per stage ({len(devices)} devices, {len(stages)} stages)")
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a positive integer ({chunks!r})")
    known = callable(reducer) or reducer in REDUCERS or isinstance(reducer, CountedMean)
    if reducer is not None and not known:
        raise ValueError(
            f"reducer must be 'mean', 'sum', a callable or a CountedMean ({reducer!r})"
        )
    if on_failure not in ("raise", "replan"):
        raise ValueError(f"on_failure must be 'raise' or 'replan' (got {on_failure!r})")
    if stage_timeout is not None and not stage_timeout > 0:
        raise ValueError(f"stage_timeout must be positive seconds ({stage_timeout!r})")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be 'autograd' or 'pipelined' (got {backward!r})")
    if backward == "pipelined":
        others = sorted({str(d) for d in devices if d.type != "cpu"})
        if others:
            raise ValueError(
                f"backward='pipelined' runs on CPU stages only (got {', '.join(others)}); "
                f"on GPUs autograd already runs each device's backward on its own thread: "
                f"use backward='autograd'"
            )
        if on_failure == "replan":
            raise ValueError(
                "backward='pipelined' cannot re-run lost micro-batches "
                "(on_failure='replan'): use backward='autograd' with it"
            )


def check_schedule_option(
    schedule: str, virtual_stages: int, devices: Sequence[torch.device]
) -> int:
    """The number of devices K of ``schedule`` over these stages with ``virtual_stages`` V
    per device (stage s on the device of stage s % K); a ValueError that shows the values
    for a schedule name, V or device list that cannot work. What depends on the micro-batch
    count is checked per call (`check_training`)."""
    if schedule not in _schedule.SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: one of {', '.join(_schedule.SCHEDULES)}")
    v, n = virtual_stages, len(devices)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"virtual_stages must be a positive integer ({v!r})")
    if n % v:
        raise ValueError(
            f"{n} stages are not {v} virtual stages per device: split the model into a "
            f"multiple of virtual_stages={v} stages, or pass another virtual_stages"
        )
    if v > 1 and schedule in ("gpipe", "1f1b"):
        raise ValueError(
            f"{schedule} runs one stage per device (virtual_stages={v}): "
            "interleaved-1f1b and zero-bubble take more"
        )
    k = n // v
    for s in range(k, n):
        if devices[s] != devices[s % k]:
            raise ValueError(
                f"with virtual_stages={v} stage s runs on the device of stage s % {k}: "
                f"stage {s} is on {devices[s]} but stage {s % k} on {devices[s % k]}; list "
                f"the {k} devices {v} times over ([d0, d1, ..., d0, d1, ...])"
            )
    return k


def check_training(
    schedule: str, num_devices: int, chunks: int, virtual_stages: int, loss_reduction: Any
) -> None:
    """What `Pipeline.train_step` needs of this call: a schedule torch can build for these
    micro-batches (`partitioner.planner.schedules.check_schedule`) and a known reduction."""
    if not callable(loss_reduction) and loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(
            f"loss_reduction must be 'mean', 'sum' or a callable counting a micro-batch "
            f"target's items (got {loss_reduction!r})"
        )
    _schedule.check_schedule(schedule, num_devices, chunks, virtual_stages)


def check_loss(value: Any) -> None:
    """A ValueError unless ``loss_fn`` returned a scalar tensor."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        what = (
            f"a tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise ValueError(
            f"loss_fn must return a scalar tensor (got {what}): reduce the micro-batch's "
            f"loss with a mean or a sum"
        )
