"""modelsplit: split a PyTorch model across devices, in one import.

The public API of the two packages that do the work, under the distribution's own name:
`partitioner` (trace, profile, solve, split, ``ModelSplitter``) and `runtime` (the pipeline).
``from modelsplit import ModelSplitter`` is ``from partitioner import ModelSplitter``; the
names that need torch load on first use, as in `partitioner`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from partitioner import (
    DeviceSpec,
    InfeasiblePlanError,
    MicroBatchError,
    ModelSplitError,
    Plan,
    PlanError,
    TraceError,
    evaluate,
)

if TYPE_CHECKING:
    from partitioner import ModelSplitter, auto_partition, profile, solve, split, trace
    from runtime import (
        CountedMean,
        DeviceFailure,
        Pipeline,
        RecoveryError,
        RunRecord,
        StageError,
        StageTimeout,
        clock_cycles,
        format_schedule,
        inject_failure,
        token_mean,
    )

_PARTITIONER = ("ModelSplitter", "auto_partition", "profile", "solve", "split", "trace")
_RUNTIME = (
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
)

__all__ = [
    "CountedMean",
    "DeviceFailure",
    "DeviceSpec",
    "InfeasiblePlanError",
    "MicroBatchError",
    "ModelSplitError",
    "ModelSplitter",
    "Pipeline",
    "Plan",
    "PlanError",
    "RecoveryError",
    "RunRecord",
    "StageError",
    "StageTimeout",
    "TraceError",
    "auto_partition",
    "clock_cycles",
    "evaluate",
    "format_schedule",
    "inject_failure",
    "profile",
    "solve",
    "split",
    "token_mean",
    "trace",
]


def __getattr__(name: str) -> Any:
    if name in _PARTITIONER:
        import partitioner

        value = getattr(partitioner, name)
    elif name in _RUNTIME:
        import runtime

        value = getattr(runtime, name)
    else:
        raise AttributeError(f"module 'modelsplit' has no attribute {name!r}")
    globals()[name] = value
    return value
