"""The planner core, free of torch: the cost model, coarsening and the solve pass.

`cost` (DeviceSpec, evaluate), `plan` (Plan and its JSON), `solver` (``solve``), the ILP
(`ilp`, `windows`, `bounds`, `levels`, `balanced`), `heuristics`, `baselines`, `coarsen`.
"""

from partitioner.planner.cost import DeviceSpec, evaluate
from partitioner.planner.plan import Plan
from partitioner.planner.solver import solve

__all__ = ["DeviceSpec", "Plan", "evaluate", "solve"]
