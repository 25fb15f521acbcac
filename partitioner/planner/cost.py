"""The cost model (docs/planner.md): devices, validation and `evaluate`.

Pure Python: numbers in, numbers out. No torch here, so the planner core can be
used and tested without it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx

__all__ = [
    "DEFAULT_BANDWIDTH",
    "NODE_ATTRS",
    "Assignment",
    "Bandwidth",
    "DeviceSpec",
    "Evaluation",
    "StageCost",
    "evaluate",
    "fmt_bytes",
    "lower_bound",
    "normalize_devices",
    "parse_bytes",
    "validate_graph",
]

#: node -> stage index
Assignment = dict[str, int]
#: bytes per second between any two devices, or a K x K matrix bandwidth[src][dst]
Bandwidth = float | Sequence[Sequence[float]]

#: A conservative host-to-device / PCIe figure (bytes per second).
DEFAULT_BANDWIDTH = 12e9

#: Attributes every CostGraph node must carry.
NODE_ATTRS = ("time", "param_bytes", "out_bytes", "act_bytes")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | float | str) -> int:
    """Parse a byte count: ``1024``, ``"16GB"``, ``"512 MiB"``, ``"25GB/s"``.

    >>> parse_bytes("16GB")
    16000000000
    """
    if isinstance(value, bool):
        raise ValueError(f"not a byte count: {value!r}")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"byte count must be finite and >= 0 (got {value!r})")
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    text = text.removesuffix("/s")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([a-z]*)", text)
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(
            f"cannot read {value!r} as bytes: use a number with an optional unit "
            f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '16GB'"
        )
    amount = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(amount):
        raise ValueError(f"cannot read {value!r} as bytes: the number is too large")
    return int(amount)


@dataclass(frozen=True)
class DeviceSpec:
    """One device a stage can run on.

    ``memory`` is in bytes (None: unlimited); ``speed`` scales the profiled time
    (a speed-2.0 device does a node's work in half its ``time``).
    """

    name: str
    memory: int | None = None
    speed: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"device name must be a non-empty string (got {self.name!r})")
        if self.memory is not None and (isinstance(self.memory, bool) or self.memory < 0):
            raise ValueError(f"device {self.name}: memory must be >= 0 bytes ({self.memory})")
        if not (isinstance(self.speed, int | float) and self.speed > 0):
            raise ValueError(f"device {self.name}: speed must be > 0 ({self.speed})")

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "memory": self.memory, "speed": self.speed}


DevicesLike = int | Sequence[DeviceSpec | str]


def normalize_devices(devices: DevicesLike, default_prefix: str = "dev") -> list[DeviceSpec]:
    """``4`` -> four identical devices; names -> specs with no memory limit."""
    if isinstance(devices, bool):
        raise ValueError(f"devices must be a positive integer or a list ({devices!r})")
    if isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"devices must be a positive integer ({devices} < 1)")
        return [DeviceSpec(f"{default_prefix}:{k}") for k in range(devices)]
    specs = [d if isinstance(d, DeviceSpec) else DeviceSpec(str(d)) for d in devices]
    if not specs:
        raise ValueError("devices must not be empty (got an empty list)")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"device names must be unique ({', '.join(twice)} given twice)")
    return specs


def validate_graph(graph: nx.DiGraph) -> None:
    """Raise ValueError naming the problem when ``graph`` is not a CostGraph."""
    if not isinstance(graph, nx.DiGraph):
        raise ValueError(f"graph must be a networkx.DiGraph (got {type(graph).__name__})")
    if graph.number_of_nodes() == 0:
        raise ValueError("graph has no nodes")
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise ValueError(f"graph has a cycle: {cycle}; a CostGraph must be acyclic")
    for node, data in graph.nodes(data=True):
        for attr in NODE_ATTRS:
            if attr not in data:
                raise ValueError(f"node {node!r} is missing attribute {attr!r}")
            value = data[attr]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"node {node!r}: {attr} must be a number (got {value!r})")
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"node {node!r}: {attr} must be finite and >= 0 (got {value})")


def fmt_bytes(n: float | None) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as ``--memory 16GB`` reads them)."""
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def bandwidth_between(bandwidth: Bandwidth, src: int, dst: int) -> float:
    if isinstance(bandwidth, int | float):
        return float(bandwidth)
    return float(bandwidth[src][dst])


def in_bandwidth(bw: Bandwidth, k: int, n: int) -> float:
    """The fastest link into stage k of n (the ILP charges tensors at it: never too much)."""
    if isinstance(bw, int | float):
        return float(bw)
    return max((bandwidth_between(bw, s, k) for s in range(n) if s != k), default=1.0)


def check_bandwidth(bandwidth: Bandwidth, num_devices: int) -> None:
    if isinstance(bandwidth, int | float):
        if isinstance(bandwidth, bool) or not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s (got {bandwidth!r})")
        return
    rows = list(bandwidth)
    if len(rows) != num_devices or any(len(r) != num_devices for r in rows):
        raise ValueError(
            f"a bandwidth matrix must be {num_devices} x {num_devices}, one row per device"
        )
    for i, row in enumerate(rows):
        for j, bw in enumerate(row):
            if i != j and not bw > 0:
                raise ValueError(f"bandwidth[{i}][{j}] must be > 0 bytes/s (got {bw!r})")


@dataclass(frozen=True)
class StageCost:
    """Figures of one stage under an assignment."""

    time: float  # sum of node time (seconds at speed 1.0)
    in_bytes: int
    cost: float  # C_k = time / speed + in_bytes / bandwidth
    param_bytes: int
    act_bytes: int
    nodes: int

    @property
    def memory(self) -> int:
        return self.param_bytes + self.act_bytes


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` returns: per-stage figures and the totals of the cost model."""

    stages: list[StageCost]
    bottleneck: float
    comm_bytes: int
    valid: bool
    violations: list[str] = field(default_factory=list)


def evaluate(
    graph: nx.DiGraph,
    assignment: Mapping[str, int],
    devices: DevicesLike,
    bandwidth: Bandwidth = DEFAULT_BANDWIDTH,
) -> Evaluation:
    """Compute the exact figures of the cost model (docs/planner.md) for ``assignment``.

    Stages are ``0..len(devices)-1``; stage k runs on ``devices[k]``. An invalid
    assignment (an edge going backwards, a memory limit exceeded) still gets its
    figures, with ``valid=False`` and the reasons in ``violations``. A node missing
    from the assignment or a stage outside the device range is a ValueError.
    """
    specs = normalize_devices(devices)
    n = len(specs)
    _check_assignment(graph, assignment, n)
    time, params, acts, count = _loads(graph, assignment, n)
    in_bytes, comm_time, violations = _receives(graph, assignment, n, bandwidth)
    stages = []
    for k, spec in enumerate(specs):
        if spec.memory is not None and params[k] + acts[k] > spec.memory:
            violations.append(
                f"stage {k} needs {fmt_bytes(params[k] + acts[k])} on {spec.name} "
                f"(limit {fmt_bytes(spec.memory)})"
            )
        cost = time[k] / spec.speed + comm_time[k]
        stages.append(StageCost(time[k], in_bytes[k], cost, params[k], acts[k], count[k]))
    return Evaluation(
        stages=stages,
        bottleneck=max(s.cost for s in stages),
        comm_bytes=sum(in_bytes),
        valid=not violations,
        violations=violations,
    )


def _check_assignment(graph: nx.DiGraph, assignment: Mapping[str, int], n: int) -> None:
    missing = [v for v in graph.nodes if v not in assignment]
    if missing:
        raise ValueError(f"assignment misses {len(missing)} node(s), e.g. {missing[:3]}")
    for v in graph.nodes:
        k = assignment[v]
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
            raise ValueError(f"node {v!r} is assigned to stage {k!r}, outside 0..{n - 1}")


def _loads(
    graph: nx.DiGraph, assignment: Mapping[str, int], n: int
) -> tuple[list[float], list[int], list[int], list[int]]:
    """Per stage: seconds of work, parameter bytes, activation bytes, node count.

    With the profile's weight table (``graph.graph["held"]``, ``["weight_bytes"]``) a weight
    counts once on each stage whose nodes read it ([Note: weights live with their readers]
    in `partitioner.profiling.costgraph`); without it each node counts its ``param_bytes``.
    """
    held: Mapping[str, Sequence[str]] = graph.graph.get("held") or {}
    sizes: Mapping[str, int] = graph.graph.get("weight_bytes") or {}
    time, params, acts, count = [0.0] * n, [0] * n, [0] * n, [0] * n
    weights: list[set[str]] = [set() for _ in range(n)]
    for v, data in graph.nodes(data=True):
        k = assignment[v]
        time[k] += float(data["time"])
        acts[k] += int(data["act_bytes"])
        count[k] += 1
        if v in held and sizes:
            weights[k].update(held[v])
        else:
            params[k] += int(data["param_bytes"])
    for k in range(n):
        params[k] += sum(int(sizes[w]) for w in weights[k])
    return time, params, acts, count


def _receives(
    graph: nx.DiGraph, assignment: Mapping[str, int], n: int, bandwidth: Bandwidth
) -> tuple[list[int], list[float], list[str]]:
    """Per stage: bytes received (each tensor once) and their seconds; backward edges."""
    in_bytes, comm_time = [0] * n, [0.0] * n
    violations: list[str] = []
    for u in graph.nodes:
        ku = assignment[u]
        for kv in {assignment[v] for v in graph.successors(u)}:
            if kv < ku:
                violations.append(f"edge from {u!r} (stage {ku}) goes back to stage {kv}")
            elif kv != ku:
                size = int(graph.nodes[u]["out_bytes"])
                in_bytes[kv] += size
                comm_time[kv] += size / bandwidth_between(bandwidth, ku, kv)
    return in_bytes, comm_time, violations


def lower_bound(graph: nx.DiGraph, devices: DevicesLike) -> float:
    """A bound no assignment beats: max(total time / total speed, heaviest node / fastest)."""
    specs = normalize_devices(devices)
    times = [float(d["time"]) for _, d in graph.nodes(data=True)]
    total_speed = sum(s.speed for s in specs)
    fastest = max(s.speed for s in specs)
    return max(sum(times) / total_speed, max(times, default=0.0) / fastest)
