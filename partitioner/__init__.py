"""modelsplit's planner: trace, profile, solve and split a PyTorch model across devices.

One subpackage per pass (docs/architecture.md): `capture` (trace), `profiling` (profile),
`planner` (coarsen and solve: no torch), `splitting` (split); `splitter` strings them
together behind ``ModelSplitter``, `cli` behind ``modelsplit``. The names that need torch
are loaded on first use, so ``import partitioner`` stays cheap and torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from partitioner.errors import (
    InfeasiblePlanError,
    MicroBatchError,
    ModelSplitError,
    PlanError,
    TraceError,
)
from partitioner.planner.cost import DeviceSpec, evaluate
from partitioner.planner.plan import Plan

if TYPE_CHECKING:
    from partitioner.capture.tracer import trace
    from partitioner.planner.solver import solve
    from partitioner.profiling.costgraph import profile
    from partitioner.splitter import ModelSplitter, auto_partition
    from partitioner.splitting.cut import split

__all__ = [
    "DeviceSpec",
    "InfeasiblePlanError",
    "MicroBatchError",
    "ModelSplitError",
    "ModelSplitter",
    "Plan",
    "PlanError",
    "TraceError",
    "auto_partition",
    "evaluate",
    "profile",
    "solve",
    "split",
    "trace",
]


def __getattr__(name: str) -> Any:
    # No submodule of this package shares a name with these functions, so importing a
    # submodule never shadows them; each is imported the first time it is asked for.
    value: Any
    if name == "trace":
        from partitioner.capture.tracer import trace

        value = trace
    elif name == "profile":
        from partitioner.profiling.costgraph import profile

        value = profile
    elif name == "solve":
        from partitioner.planner.solver import solve

        value = solve
    elif name == "split":
        from partitioner.splitting.cut import split

        value = split
    elif name == "ModelSplitter":
        from partitioner.splitter import ModelSplitter

        value = ModelSplitter
    elif name == "auto_partition":
        from partitioner.splitter import auto_partition

        value = auto_partition
    else:
        raise AttributeError(f"module 'partitioner' has no attribute {name!r}")
    globals()[name] = value
    return value
