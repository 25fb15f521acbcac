"""modelsplit's planner: trace, profile, solve and split a PyTorch model across devices.

The planner core (`cost`, `plan`, `solve`, `coarsen`, `baselines`) imports no torch;
the names that need torch are loaded on first use, so ``import partitioner`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from partitioner.cost import DeviceSpec, evaluate
from partitioner.errors import InfeasiblePlanError, ModelSplitError, PlanError, TraceError
from partitioner.plan import Plan

if TYPE_CHECKING:
    from partitioner.profile import profile
    from partitioner.solve import solve
    from partitioner.split import split
    from partitioner.splitter import ModelSplitter, auto_partition
    from partitioner.trace import trace

__all__ = [
    "DeviceSpec",
    "InfeasiblePlanError",
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

_LAZY = {
    "trace": "partitioner.trace",
    "profile": "partitioner.profile",
    "solve": "partitioner.solve",
    "split": "partitioner.split",
    "ModelSplitter": "partitioner.splitter",
    "auto_partition": "partitioner.splitter",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'partitioner' has no attribute {name!r}")
