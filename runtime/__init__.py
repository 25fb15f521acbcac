"""modelsplit's runtime: a threaded, stream-based pipeline over devices."""

from __future__ import annotations

from runtime.errors import StageError
from runtime.microbatch import CountedMean, token_mean
from runtime.pipeline import Pipeline, RunRecord
from runtime.recovery.drill import inject_failure
from runtime.recovery.faults import DeviceFailure, RecoveryError, StageTimeout
from runtime.schedule import clock_cycles, format_schedule

__all__ = [
    "CountedMean",
    "DeviceFailure",
    "Pipeline",
    "RecoveryError",
    "RunRecord",
    "StageError",
    "StageTimeout",
    "clock_cycles",
    "format_schedule",
    "inject_failure",
    "token_mean",
]
