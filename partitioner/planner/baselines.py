"""Baseline partitions under the same cost model, so users can compare with `solve`.

Every policy cuts one topological order into contiguous pieces (always valid: no
edge can go backwards) and returns a Plan with status ``"baseline"``:

- ``"uniform"``: equal numbers of layers per stage, like DeepSpeed's ``uniform``
  and torchtitan. A layer is a run of nodes under one numbered block of the
  ``module`` path (``transformer.h.3``); without module paths, a compute node;
- ``"parameters"``: balanced parameter bytes, like DeepSpeed's ``parameters``;
- ``"greedy-memory"``: fill devices in order up to their memory, like
  accelerate's ``device_map="auto"`` (everything on the first device when it fits);
- ``"time-dp"``: the best contiguous split by compute time and device speed,
  like torchgpipe's ``balance_by_time``;
- ``"layer-dp"``: layers (as for ``uniform``) balanced by forward + backward time
  (``time + bwd_time``; forward alone on an inference profile), the schedule-aware
  auto-partitioning of PyTorch pull request #179212 (from torchtitan #2113), ported from its
  description: a DP over contiguous layer splits minimising the critical path of a 1F1B-like
  schedule, ``sum_s c_s + (M - 1) max_s c_s`` with ``c_s`` a stage's forward + backward plus
  a constant communication cost per stage. With that constant the sum is the same for every
  split into the same number of stages, so the minimiser is the split of least largest
  stage, found here by bisection (`_balanced_cuts`), not by their DP.

A heavy LM head or embedding shows their known weakness: ``uniform`` and
``parameters`` count it as one layer (or as its weight) and leave its stage the
bottleneck. A policy whose plan breaks a memory limit raises InfeasiblePlanError.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import networkx as nx

from partitioner.errors import InfeasiblePlanError
from partitioner.planner.cost import (
    DEFAULT_BANDWIDTH,
    Bandwidth,
    DevicesLike,
    DeviceSpec,
    check_bandwidth,
    evaluate,
    lower_bound,
    normalize_devices,
    validate_graph,
)
from partitioner.planner.heuristics import Indexed, index_graph, sources_late, split_by_time
from partitioner.planner.plan import Plan, make_plan

__all__ = ["POLICIES", "baseline", "baseline_stages"]

POLICIES = ("uniform", "parameters", "greedy-memory", "time-dp", "layer-dp")

_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def baseline(
    graph: nx.DiGraph,
    devices: DevicesLike,
    policy: str,
    *,
    bandwidth: Bandwidth = DEFAULT_BANDWIDTH,
    chunks: int = 1,
    model: str = "",
) -> Plan:
    """Partition ``graph`` with a fixed ``policy`` (one of `POLICIES`)."""
    validate_graph(graph)
    specs = normalize_devices(devices)
    check_bandwidth(bandwidth, len(specs))
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES} (got {policy!r})")
    g = index_graph(graph, sources_late(graph))
    stage = baseline_stages(graph, g, specs, policy)
    assignment = dict(zip(g.names, stage, strict=True))
    ev = evaluate(graph, assignment, specs, bandwidth)
    if not ev.valid:
        raise InfeasiblePlanError(f"baseline {policy!r}: " + "; ".join(ev.violations))
    return make_plan(
        graph,
        assignment,
        specs,
        bandwidth=bandwidth,
        lower_bound=lower_bound(graph, specs),
        status="baseline",
        solver=f"baseline:{policy}",
        chunks=chunks,
        model=model or str(graph.graph.get("model", "")),
    )


def baseline_stages(
    graph: nx.DiGraph, g: Indexed, specs: Sequence[DeviceSpec], policy: str
) -> list[int]:
    """The stage of each node of ``g`` (topological order) under ``policy``.

    The stages may break a memory limit (``uniform``, ``parameters``); raises
    InfeasiblePlanError when the policy itself finds nothing that fits.
    """
    if policy == "uniform":
        return _pieces(_layers(graph, g), len(specs), [1.0] * g.n)
    if policy == "parameters":
        return _pieces(_layers(graph, g, by_node=True), len(specs), _params(graph, g))
    if policy == "greedy-memory":
        return _fill(g, specs)
    if policy == "layer-dp":
        work = [float(graph.nodes[v]["time"]) + _bwd(graph, v) for v in g.names]
        return _pieces(_layers(graph, g), len(specs), work)
    found = split_by_time(g, specs)
    if found is None:
        raise InfeasiblePlanError("time-dp: no contiguous split fits the memory limits")
    return found


def _bwd(graph: nx.DiGraph, v: str) -> float:
    return float(graph.nodes[v].get("bwd_time", 0.0) or 0.0)


def _params(graph: nx.DiGraph, g: Indexed) -> list[float]:
    return [float(graph.nodes[v]["param_bytes"]) for v in g.names]


def _layers(graph: nx.DiGraph, g: Indexed, by_node: bool = False) -> list[int]:
    """Unit index per node in topological order; a unit is a layer (or a node)."""
    keys: list[str | None] = []
    for v in g.names:
        module = str(graph.nodes[v].get("module", "") or "")
        m = _BLOCK.match(module)
        keys.append(m.group(1) if m else (module.split(".")[0] or None))
    use_modules = not by_node and any(k is not None for k in keys)
    unit, units, prev = -1, [0] * g.n, object()
    for i in range(g.n):
        if use_modules:
            key: object = keys[i]
            if key is not None and key != prev:
                unit, prev = unit + 1, key
        elif g.time[i] > 0 or by_node:
            unit += 1
        units[i] = max(unit, 0)
    return units


def _pieces(units: list[int], k: int, weight: Sequence[float]) -> list[int]:
    """Cut the unit sequence into <= k contiguous pieces of near-equal total weight."""
    n_units = max(units) + 1 if units else 1
    per_unit = [0.0] * n_units
    for u, w in zip(units, weight, strict=True):
        per_unit[u] += w
    cuts = _balanced_cuts(per_unit, k)
    piece, j = [0] * n_units, 0
    for u in range(n_units):
        while j < len(cuts) and u >= cuts[j]:
            j += 1
        piece[u] = j
    return [piece[u] for u in units]


def _balanced_cuts(w: list[float], k: int) -> list[int]:
    """Start indices of pieces 1..k-1 minimising the largest piece (bisection + greedy)."""
    if k <= 1 or len(w) <= 1:
        return []
    if all(x == w[0] for x in w):  # equal units: equal counts, the remainder spread first
        n = len(w)
        return sorted({(n * j + k - 1) // k for j in range(1, k)} - {0, n})
    lo, hi = max(w), sum(w)
    for _ in range(100):
        mid = (lo + hi) / 2
        if _count(w, mid) <= k:
            hi = mid
        else:
            lo = mid
    cuts, acc = [], 0.0
    for i, x in enumerate(w):
        if acc + x > hi and acc > 0:
            cuts.append(i)
            acc = 0.0
        acc += x
    return cuts[: k - 1]


def _count(w: list[float], cap: float) -> int:
    pieces, acc = 1, 0.0
    for x in w:
        if acc + x > cap and acc > 0:
            pieces, acc = pieces + 1, 0.0
        acc += x
    return pieces


def _capacity(spec: DeviceSpec) -> float:
    return float("inf") if spec.memory is None else float(spec.memory)


def _fill(g: Indexed, specs: Sequence[DeviceSpec]) -> list[int]:
    stage, k, used = [0] * g.n, 0, 0
    for i in range(g.n):
        while used + g.mem[i] > _capacity(specs[k]):
            if k == len(specs) - 1:
                raise InfeasiblePlanError("greedy-memory: the model does not fit the devices")
            k, used = k + 1, 0
        stage[i] = k
        used += g.mem[i]
    return stage
