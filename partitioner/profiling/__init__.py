"""The profile pass: measure every node of a traced module into a CostGraph.

`measure` times and sizes each fx node; `costgraph` turns the measurements into the
networkx graph the planner reads.
"""

from partitioner.profiling.costgraph import profile

__all__ = ["profile"]
