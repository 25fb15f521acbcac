"""modelsplit's planner: trace, profile, solve and split a PyTorch model across devices.

The planner core (`cost`, `plan`, `solve`, `coarsen`, `baselines`) imports no torch;
the names that need torch are loaded on first use, so ``import partitioner`` is cheap.
"""

from __future__ import annotations

import importlib
import sys
import types
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
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'partitioner' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps ``partitioner.trace`` the function when the module of that name is imported.

    Importing a submodule sets it as an attribute of its package, which would make
    ``from partitioner import trace`` return the module ``partitioner.trace`` rather
    than the function once anything had imported that module. Submodules stay
    reachable through ``from partitioner.trace import ...`` (sys.modules).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
