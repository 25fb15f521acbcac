"""What counts as a lost device (the fire-drill injector is `runtime.recovery.drill`).

[Note: what counts as a device failure]
A device failure is a fault after which the device cannot run this process's work any more,
so the only way on is to re-plan without it (`runtime.recovery.resume`). `is_device_failure`
says yes to:

- `DeviceFailure`, raised by `runtime.recovery.drill.inject_failure` and by users' own health
  checks, and its subclass `StageTimeout`: a worker that sent no result within
  ``stage_timeout`` seconds;
- a CUDA error whose message names a fault that leaves the device's context unusable
  (`LOST_DEVICE_ERRORS`): an illegal memory access, an unspecified launch failure, an
  uncorrectable ECC error, a launch timeout, an illegal instruction, a hardware stack error,
  a misaligned address, "CUDA error: unknown error" (what a GPU that fell off the bus
  reports), and a device that is busy, unavailable or no longer detected.

Everything else is the user's error and is re-raised with no re-plan: a shape or dtype
mismatch, a bug in the model, an out-of-memory error (a capacity problem, not a dead device:
re-planning on fewer devices would not help), and a device-side assert. A device-side assert
also poisons the CUDA context, but it is the model's own check failing on the data (an index
out of range in an embedding): the same micro-batch would trip it on any device, so
re-planning would only kill the survivors one by one.
"""

from __future__ import annotations

from typing import Any

import torch

from runtime.errors import StageError

__all__ = [
    "LOST_DEVICE_ERRORS",
    "DeviceFailure",
    "RecoveryError",
    "StageTimeout",
    "device_names",
    "is_device_failure",
    "lost_memory",
    "rebind_hook",
]

# Lower-case fragments of CUDA error messages that mean the device is lost to this process.
LOST_DEVICE_ERRORS = (
    "an illegal memory access was encountered",
    "unspecified launch failure",
    "uncorrectable ecc error encountered",
    "the launch timed out and was terminated",
    "an illegal instruction was encountered",
    "hardware stack error",
    "misaligned address",
    "cuda error: unknown error",
    "busy or unavailable",
    "no cuda-capable device is detected",
)

# Not a lost device: the model's own assertion (see the module docstring).
USER_CUDA_ERRORS = ("device-side assert triggered",)


class DeviceFailure(RuntimeError):
    """A device is lost: raise it from a health check, or let `inject_failure` do it."""

    def __init__(self, device: str, reason: str = "device failed") -> None:
        self.device = device
        self.reason = reason
        super().__init__(f"{device}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.device, self.reason))


class StageTimeout(DeviceFailure):
    """A stage's worker sent no result within the pipeline's ``stage_timeout``."""


class RecoveryError(RuntimeError):
    """Re-planning is impossible: every device failed, or the model no longer fits."""

    def __init__(self, message: str, failed_devices: list[str]) -> None:
        self.failed_devices = list(failed_devices)
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.failed_devices))


def is_device_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or, for a `StageError`, the exception the stage raised) means a lost
    device; see [Note: what counts as a device failure]."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StageError):
            current = current.original
            continue
        if isinstance(current, DeviceFailure):
            return True
        if _is_lost_cuda(current):
            return True
        current = current.__cause__
    return False


def _is_lost_cuda(exc: BaseException) -> bool:
    if not isinstance(exc, RuntimeError) or "OutOfMemory" in type(exc).__name__:
        return False
    text = str(exc).lower()
    if any(user in text for user in USER_CUDA_ERRORS):
        return False
    return any(lost in text for lost in LOST_DEVICE_ERRORS)


def lost_memory(name: str) -> torch.device | None:
    """The torch device whose memory is gone when device ``name`` fails; None for a CPU
    worker (or any name that is not a torch device), whose memory is the host's."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return None
    return None if device.type == "cpu" else device


def device_names(pipe: Any) -> list[str]:
    """The device name of each stage of a `runtime.Pipeline`.

    ``pipe.device_names`` when set (ModelSplitter sets the plan's names, such as ``cpu:2``);
    otherwise each CPU stage is a worker of its own (``cpu:<stage>``) and any other stage is
    named after its torch device (``cuda:1``).
    """
    names = getattr(pipe, "device_names", None)
    if names is not None:
        return list(names)
    return [f"cpu:{j}" if d.type == "cpu" else str(d) for j, d in enumerate(pipe.devices)]


def rebind_hook(hook: Any, pipe: Any) -> Any:
    """``hook`` carried over to ``pipe``, a pipeline that replaced the one it was on: a hook
    with a ``rebind(pipe)`` method (an injected failure) follows the pipeline; others stay."""
    rebind = getattr(hook, "rebind", None)
    return hook if rebind is None else rebind(pipe)
