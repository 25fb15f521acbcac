"""The figures of a training plan: a CostGraph at another micro-batch size, the step time and
peak memory of an assignment under a schedule, and a lower bound on the step time.

Pure numbers, no torch. The forward figures are `evaluate`'s, the step and the memory are
`simulate`'s (docs/planner.md, "Training plans"), so a training plan's figures have one
source, as an inference plan's do.

[Note: rescaling by micro-batch size]
A profile times each node at one micro-batch size (``graph.graph["micro_batch_size"]`` rows
of a batch of ``graph.graph["batch_size"]``). A plan for M micro-batches runs micro-batches
of ``ceil(batch / M)`` rows (the largest `torch.tensor_split` makes), and `rescaled` scales
every node's ``time``, ``bwd_time``, ``act_bytes`` and ``out_bytes`` by the ratio of rows.
That is an approximation: kernels are not linear in their rows (small micro-batches run
below peak, so fewer rows cost more than the ratio says), and a tensor that does not grow
with the batch (a mask built from a constant) is scaled all the same. Weights
(``param_bytes``) do not scale. Profiling at the chosen micro-batch size removes the
approximation; `solve` notes when it applied it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

from partitioner.planner.cost import (
    Bandwidth,
    DeviceSpec,
    Evaluation,
    bandwidth_between,
    evaluate,
)
from partitioner.planner.schedules import actions
from partitioner.planner.simulation import Simulation, simulate

__all__ = [
    "StepFigures",
    "in_flight",
    "micro_rows",
    "rescaled",
    "stage_bandwidth",
    "stage_specs",
    "step_figures",
    "step_lower_bound",
    "tied_seconds",
]

#: node attributes that grow with the rows of a micro-batch ([Note: rescaling by micro-batch
#: size]); the byte counts stay whole numbers
SCALED = ("time", "bwd_time")
SCALED_BYTES = ("act_bytes", "out_bytes")


def micro_rows(graph: nx.DiGraph, chunks: int, batch_size: int | None = None) -> int | None:
    """Rows of the largest of `chunks` micro-batches of the batch (``batch_size`` or the
    profile's), or None when the batch size is unknown."""
    batch = batch_size if batch_size is not None else graph.graph.get("batch_size")
    if batch is None:
        return None
    return max(1, math.ceil(int(batch) / chunks))


def rescaled(graph: nx.DiGraph, chunks: int, batch_size: int | None = None) -> nx.DiGraph:
    """``graph`` at `chunks` micro-batches: each node's time, bwd_time, act_bytes and
    out_bytes times ``micro_rows / graph.graph["micro_batch_size"]`` ([Note: rescaling by
    micro-batch size]). The graph itself when the two sizes agree or either is unknown."""
    rows, profiled = micro_rows(graph, chunks, batch_size), graph.graph.get("micro_batch_size")
    if rows is None or profiled is None or rows == int(profiled):
        return graph
    factor = rows / int(profiled)
    out = graph.copy()  # new attribute dicts; the weight tables are shared, never written
    for _, data in out.nodes(data=True):
        for name in SCALED:
            if name in data:
                data[name] = float(data[name]) * factor
        for name in SCALED_BYTES:
            data[name] = round(int(data[name]) * factor)
    out.graph.update(chunks=chunks, micro_batch_size=rows)
    if batch_size is not None:
        out.graph["batch_size"] = batch_size
    return out


def stage_specs(specs: Sequence[DeviceSpec], virtual_stages: int) -> list[DeviceSpec]:
    """One spec per stage (stage s on ``specs[s % K]``), named ``"<device>#<s>"`` and without
    a memory limit: a training stage's memory is the simulation's peak, not evaluate's."""
    k = len(specs)
    return [
        DeviceSpec(f"{specs[s % k].name}#{s}", None, specs[s % k].speed)
        for s in range(k * virtual_stages)
    ]


def stage_bandwidth(
    bandwidth: Bandwidth, num_devices: int, virtual_stages: int, same: float = math.inf
) -> Bandwidth:
    """The bandwidth between stages: the devices' (stage s on device s % K), and `same`
    between two stages of one device (infinite: a tensor that stays on its device is free)."""
    if virtual_stages == 1:
        return bandwidth
    k, n = num_devices, num_devices * virtual_stages
    return [
        [same if a % k == b % k else bandwidth_between(bandwidth, a % k, b % k) for b in range(n)]
        for a in range(n)
    ]


@dataclass(frozen=True)
class StepFigures:
    """A training plan's figures: `forward` (evaluate's, per stage and micro-batch), the
    `simulation` of one step, and `tied` (seconds per step to exchange the gradients of
    weights read on more than one device)."""

    forward: Evaluation
    simulation: Simulation
    tied: float

    @property
    def step_time(self) -> float:
        return self.simulation.step_time + self.tied

    @property
    def peak_memory(self) -> list[int]:
        return list(self.simulation.peak_bytes)


def step_figures(
    graph: nx.DiGraph,
    assignment: Mapping[str, int],
    specs: Sequence[DeviceSpec],
    bandwidth: Bandwidth,
    schedule: str,
    chunks: int,
    virtual_stages: int = 1,
    checkpoint: bool = False,
) -> StepFigures:
    """The figures of ``assignment`` (stages 0..K*V-1, stage s on ``specs[s % K]``) under
    `schedule` with `chunks` micro-batches, on ``graph`` as it is (already `rescaled`).

    Per stage s on a device of speed p: forward ``sum(time) / p``, backward
    ``sum(bwd_time) / p`` (plus the forward again with `checkpoint`), the transfer into
    stage s + 1 its receive seconds (``cost - time / p``: ``in_bytes / bandwidth``, free
    between stages of one device), and the weight-grad half of a zero-bubble backward
    ``sum(bwd_time) / 2p``. Memory: a micro-batch keeps ``act_bytes`` alive from its
    forward to its backward; with `checkpoint` only the stage's inputs (``in_bytes``), while
    one micro-batch's ``act_bytes`` (its recomputation) are counted with the weights, two
    with a schedule other than GPipe: the runtime's recomputation (``"except_last"``, as
    torchgpipe's) keeps the last micro-batch's activations, which a 1F1B-like schedule holds
    while it recomputes the backwards before it (GPipe runs that micro-batch's backward
    first, so never two at once).
    """
    k, v = len(specs), virtual_stages
    ev = evaluate(graph, assignment, stage_specs(specs, v), stage_bandwidth(bandwidth, k, v))
    speed = [specs[s % k].speed for s in range(k * v)]
    bwd = [0.0] * (k * v)
    for node, data in graph.nodes(data=True):
        bwd[assignment[node]] += float(data.get("bwd_time", 0.0))
    fwd = [st.time / p for st, p in zip(ev.stages, speed, strict=True)]
    back = [b / p + (f if checkpoint else 0.0) for b, p, f in zip(bwd, speed, fwd, strict=True)]
    held = (1 if schedule == "gpipe" else 2) if checkpoint else 0  # full activations kept
    sim = simulate(
        fwd,
        back,
        schedule,
        chunks,
        num_devices=k,
        virtual_stages=v,
        send=[max(0.0, st.cost - st.time / p) for st, p in zip(ev.stages, speed, strict=True)][1:],
        act_bytes=[st.in_bytes if checkpoint else st.act_bytes for st in ev.stages],
        param_bytes=[st.param_bytes + held * st.act_bytes for st in ev.stages],
        weight_grad=[b / p / 2 for b, p in zip(bwd, speed, strict=True)],
    )
    return StepFigures(ev, sim, tied_seconds(graph, assignment, k, bandwidth))


def tied_seconds(
    graph: nx.DiGraph, assignment: Mapping[str, int], num_devices: int, bandwidth: Bandwidth
) -> float:
    """Seconds per step to exchange tied weights' gradients: ``bytes / bandwidth`` (the
    slowest link between its devices) for each weight that nodes on more than one device
    read (the profile's ``held`` and ``weight_bytes`` tables; docs/architecture.md,
    "Training plans and tied weights"). Stage s is on device ``s % num_devices``."""
    held: Mapping[str, Sequence[str]] = graph.graph.get("held") or {}
    sizes: Mapping[str, int] = graph.graph.get("weight_bytes") or {}
    readers: dict[str, set[int]] = {}
    for node, weights in held.items():
        if node in assignment:
            for w in weights:
                readers.setdefault(w, set()).add(assignment[node] % num_devices)
    seconds = 0.0
    for w, devices in sorted(readers.items()):
        if len(devices) > 1 and w in sizes:
            links = [
                bandwidth_between(bandwidth, a, b) for a in devices for b in devices if a != b
            ]
            seconds += int(sizes[w]) / min(links)
    return seconds


def in_flight(schedule: str, num_devices: int, chunks: int, virtual_stages: int) -> list[int]:
    """Per stage, the most micro-batches whose activations it holds at once: from its
    forward until its backward (its weight-grad in zero-bubble), walking its device's order
    as `simulate` does. GPipe: M on every stage; 1F1B: ``min(M, K - s)`` on stage s."""
    per_device = actions(schedule, num_devices, chunks, virtual_stages)
    release = "W" if schedule == "zero-bubble" else "B"
    most = [0] * (num_devices * virtual_stages)
    for ops in per_device:
        alive: Counter[int] = Counter()
        for a in ops:
            if a.kind == "F":
                alive[a.stage] += 1
                most[a.stage] = max(most[a.stage], alive[a.stage])
            elif a.kind == release:
                alive[a.stage] -= 1
    return most


def step_lower_bound(graph: nx.DiGraph, specs: Sequence[DeviceSpec], chunks: int) -> float:
    """A step time no assignment of ``graph`` to ``specs`` (or to fewer of them) beats under
    any schedule of `chunks` micro-batches, with or without recomputation.

    With ``w_v = time + bwd_time`` per node and W their sum: a device works ``chunks`` times
    on each node it holds, so the step is at least ``chunks * W / sum(speed)`` and
    ``chunks * max(w) / max(speed)``; and one micro-batch's forward and backward through
    every stage form a chain, at least ``W / max(speed)``. Transfers and the tied weights'
    exchange only add to the step, recomputation only adds work.
    """
    work = [float(d["time"]) + float(d.get("bwd_time", 0.0)) for _, d in graph.nodes(data=True)]
    total, fastest = sum(work), max(s.speed for s in specs)
    return max(
        chunks * total / sum(s.speed for s in specs),
        chunks * max(work, default=0.0) / fastest,
        total / fastest,
    )
