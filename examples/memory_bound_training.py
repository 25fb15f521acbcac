"""A training plan bound by activation memory: GPipe does not fit, 1F1B does.

Eight equal transformer-like blocks on four 2 GB devices, trained in 8 micro-batches of 4
rows. Each block holds 100 MB of weights and keeps 150 MB of activations alive per
micro-batch until its backward. GPipe keeps all 8 micro-batches alive on every stage:
2 blocks x (100 MB + 8 x 150 MB) = 2.6 GB, over the 2 GB. 1F1B keeps at most 4 - d on
device d: 2 x 100 MB + 4 x 300 MB = 1.4 GB on device 0. `solve` finds that by itself and
says why in the plan's notes.

The CostGraph is built by hand with the fields a training profile has (``bwd_time`` per
node, ``act_bytes`` per micro-batch, the batch and micro-batch sizes), so the example runs
without torch; `profile(gm, inputs, training=True)` gives the same fields for a real model.

    python examples/memory_bound_training.py
"""

from __future__ import annotations

import networkx as nx

from partitioner.errors import InfeasiblePlanError
from partitioner.planner.cost import DeviceSpec, fmt_bytes
from partitioner.planner.plan import Plan
from partitioner.planner.solver import solve

BLOCKS = 8
MB = 10**6
DEVICES = [DeviceSpec(f"cpu:{k}", memory=2000 * MB) for k in range(4)]


def block_graph(blocks: int = BLOCKS) -> nx.DiGraph:
    """A chain of equal blocks, profiled at 4 rows of a batch of 32 (8 micro-batches)."""
    g = nx.DiGraph()
    for i in range(blocks):
        g.add_node(
            f"block{i}",
            time=0.010,  # 10 ms forward per micro-batch
            bwd_time=0.020,  # 20 ms backward
            param_bytes=100 * MB,
            act_bytes=150 * MB,  # kept for backward, per micro-batch
            out_bytes=4 * MB,  # the hidden state sent to the next block
            order=i,
        )
        if i:
            g.add_edge(f"block{i - 1}", f"block{i}")
    g.graph.update(model="Blocks", training=True, batch_size=32, micro_batch_size=4, chunks=8)
    return g


def plans(graph: nx.DiGraph) -> dict[str, Plan | str]:
    """GPipe alone, the two schedules the threaded runtime runs, and every schedule."""
    found: dict[str, Plan | str] = {}
    for label, schedule in (
        ("gpipe", "gpipe"),
        ("gpipe or 1f1b", ["gpipe", "1f1b"]),
        ("auto", "auto"),
    ):
        try:
            found[label] = solve(
                graph, DEVICES, schedule=schedule, chunks=8, checkpoint=False, time_limit=10
            )
        except InfeasiblePlanError as e:
            found[label] = str(e)
    return found


def main() -> dict[str, Plan | str]:
    found = plans(block_graph())
    for label, plan in found.items():
        print(f"== schedule={label!r}")
        if isinstance(plan, str):
            print(f"   infeasible: {plan}")
            continue
        peaks = ", ".join(fmt_bytes(p) for p in plan.peak_memory or [])
        print(f"   {plan.schedule}, step {plan.step_time:.3f} s, peak memory {peaks}")
        for note in plan.notes:
            print(f"   - {note}")
    return found


if __name__ == "__main__":
    main()
