"""The Plan: an assignment of graph nodes to stages, with its figures, as versioned JSON.

Loading never executes code: a plan file is plain JSON, checked field by field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from partitioner.errors import PlanError
from partitioner.planner.cost import (
    DEFAULT_BANDWIDTH,
    Assignment,
    Bandwidth,
    DevicesLike,
    DeviceSpec,
    evaluate,
    normalize_devices,
)

__all__ = ["SCHEMA", "Plan", "StageInfo", "make_plan"]

SCHEMA = "modelsplit.plan/1"

#: Statuses a plan may carry: proven within the requested gap; a solution without
#: that proof; the best heuristic when the ILP found nothing; a baseline policy.
STATUSES = ("optimal", "feasible", "heuristic", "baseline")


def default_chunks(num_devices: int) -> int:
    """Micro-batches per batch when none are asked for: ModelSplitter's and the CLI's."""
    # GPipe wants m >> n to shrink the bubble (n-1)/(m+n-1); 2n keeps micro-batches large
    # enough for CPU kernels to stay efficient.
    return 1 if num_devices == 1 else 2 * num_devices


@dataclass(frozen=True)
class StageInfo:
    """Predicted figures of one stage (times in seconds, sizes in bytes)."""

    device: str
    nodes: int
    time: float
    in_bytes: int
    cost: float
    param_bytes: int
    act_bytes: int
    first: str | None = None
    last: str | None = None

    @property
    def memory(self) -> int:
        return self.param_bytes + self.act_bytes


@dataclass
class Plan:
    """An assignment ``node -> stage`` and the figures `evaluate` gives it.

    ``devices`` are the names of the devices stages run on (stage k on
    ``devices[k]``); ``device_specs`` keep their memory and speed. Only the
    stages that hold nodes are listed: a plan may use fewer devices than it was
    offered, but never leaves an empty stage between two used ones.
    """

    assignment: Assignment
    device_specs: list[DeviceSpec]
    stages: list[StageInfo]
    bottleneck: float
    comm_bytes: int
    lower_bound: float
    gap: float
    status: str
    solver: str
    solve_time: float = 0.0
    objective: str = "throughput"
    bandwidth: Bandwidth = DEFAULT_BANDWIDTH
    chunks: int = 1
    signature: list[Any] = field(default_factory=list)
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    # -- views ---------------------------------------------------------------
    @property
    def devices(self) -> list[str]:
        """Device names of the used stages, in stage order."""
        return [s.device for s in self.stages]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def on_devices(self, devices: Sequence[DeviceSpec]) -> Plan:
        """The same assignment with stage j on ``devices[j]`` (figures kept as planned)."""
        if len(devices) != self.num_stages:
            raise PlanError(
                f"the plan has {self.num_stages} stages but {len(devices)} devices were given; "
                f"give one device per stage or re-plan for these devices"
            )
        stages = [replace(s, device=d.name) for s, d in zip(self.stages, devices, strict=True)]
        return replace(self, device_specs=list(devices), stages=stages)

    def stage_nodes(self, j: int) -> list[str]:
        return [v for v, k in self.assignment.items() if k == j]

    # -- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "objective": self.objective,
            "status": self.status,
            "solver": self.solver,
            "solve_time": self.solve_time,
            "bottleneck": self.bottleneck,
            "comm_bytes": self.comm_bytes,
            "lower_bound": self.lower_bound,
            "gap": self.gap,
            "bandwidth": self.bandwidth
            if isinstance(self.bandwidth, int | float)
            else [list(r) for r in self.bandwidth],
            "chunks": self.chunks,
            "signature": self.signature,
            "devices": [d.to_dict() for d in self.device_specs],
            "stages": [
                {
                    "device": s.device,
                    "nodes": s.nodes,
                    "time": s.time,
                    "in_bytes": s.in_bytes,
                    "cost": s.cost,
                    "param_bytes": s.param_bytes,
                    "act_bytes": s.act_bytes,
                    "first": s.first,
                    "last": s.last,
                }
                for s in self.stages
            ],
            "assignment": dict(self.assignment),
            "meta": self.meta,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.write("\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return _plan_from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PlanError(f"cannot read plan file {os.fspath(path)!r}: {e.strerror}") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(
                f"plan file {os.fspath(path)!r} is not valid JSON "
                f"(line {e.lineno}, column {e.colno}: {e.msg}); "
                f"re-create it with `modelsplit plan`"
            ) from e
        return _plan_from_dict(data)

    # -- checks --------------------------------------------------------------
    def validate(self, node_names: Iterable[str], graph: nx.DiGraph | None = None) -> None:
        """Check that this plan fits a model whose graph has ``node_names``.

        Raises PlanError naming the first mismatch: a node the model lacks, a
        model node the plan does not place, or (with ``graph``) an edge whose
        stage goes backwards.
        """
        names = set(node_names)
        unknown = sorted(set(self.assignment) - names)
        if unknown:
            raise PlanError(
                f"plan places {len(unknown)} node(s) the model does not have, e.g. "
                f"{unknown[:3]}; this plan was made for another model ({self.model or '?'}): "
                f"re-plan with auto_partition or `modelsplit plan`"
            )
        absent = sorted(names - set(self.assignment))
        if absent:
            raise PlanError(
                f"plan does not place {len(absent)} node(s) of the model, e.g. {absent[:3]}; "
                f"re-plan with auto_partition or `modelsplit plan`"
            )
        if graph is not None:
            for u, v in graph.edges:
                if self.assignment[u] > self.assignment[v]:
                    raise PlanError(
                        f"plan stage order goes backwards on edge {u!r} (stage "
                        f"{self.assignment[u]}) -> {v!r} (stage {self.assignment[v]})"
                    )


def _need(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise PlanError(f"plan field {key!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise PlanError(f"plan field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _plan_from_dict(data: Mapping[str, Any]) -> Plan:
    if not isinstance(data, Mapping):
        raise PlanError("a plan must be a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise PlanError(f"unknown plan schema {schema!r}: this version reads {SCHEMA!r}")
    num = (int, float)
    assignment = _need(data, "assignment", dict)
    devices_raw = _need(data, "devices", list)
    stages_raw = _need(data, "stages", list)
    try:
        specs = [
            DeviceSpec(str(d["name"]), d.get("memory"), float(d.get("speed", 1.0)))
            for d in devices_raw
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"plan field 'devices' is malformed: {e}") from e
    try:
        stages = [
            StageInfo(
                device=str(s["device"]),
                nodes=int(s["nodes"]),
                time=float(s["time"]),
                in_bytes=int(s["in_bytes"]),
                cost=float(s["cost"]),
                param_bytes=int(s["param_bytes"]),
                act_bytes=int(s["act_bytes"]),
                first=s.get("first"),
                last=s.get("last"),
            )
            for s in stages_raw
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"plan field 'stages' is malformed: {e}") from e
    for v, k in assignment.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(stages):
            raise PlanError(
                f"plan field 'assignment': node {v!r} goes to stage {k!r}, "
                f"outside 0..{len(stages) - 1}"
            )
    if len(stages) > len(specs):
        raise PlanError(f"plan field 'stages' lists {len(stages)} stages for {len(specs)} devices")
    status = _need(data, "status", str)
    if status not in STATUSES:
        raise PlanError(f"plan field 'status' is {status!r}, not one of {STATUSES}")
    bandwidth = data.get("bandwidth", DEFAULT_BANDWIDTH)
    return Plan(
        assignment=dict(assignment),
        device_specs=specs,
        stages=stages,
        bottleneck=float(_need(data, "bottleneck", num)),
        comm_bytes=int(_need(data, "comm_bytes", num)),
        lower_bound=float(_need(data, "lower_bound", num)),
        gap=float(_need(data, "gap", num)),
        status=status,
        solver=str(_need(data, "solver", str)),
        solve_time=float(data.get("solve_time", 0.0)),
        objective=str(data.get("objective", "throughput")),
        bandwidth=bandwidth,
        chunks=int(data.get("chunks", 1)),
        signature=list(data.get("signature", [])),
        model=str(data.get("model", "")),
        meta=dict(data.get("meta", {})),
    )


def _compact(assignment: Mapping[str, int]) -> tuple[Assignment, list[int]]:
    """Renumber used stages 0..n-1 keeping order; return the map and the used stage ids."""
    used = sorted(set(assignment.values()))
    remap = {k: j for j, k in enumerate(used)}
    return {v: remap[k] for v, k in assignment.items()}, used


def make_plan(
    graph: nx.DiGraph,
    assignment: Mapping[str, int],
    devices: DevicesLike,
    *,
    bandwidth: Bandwidth = DEFAULT_BANDWIDTH,
    lower_bound: float,
    status: str,
    solver: str,
    solve_time: float = 0.0,
    objective: str = "throughput",
    chunks: int = 1,
    signature: Sequence[Any] = (),
    model: str = "",
    meta: Mapping[str, Any] | None = None,
) -> Plan:
    """Build a Plan whose figures are exactly `evaluate` on ``assignment``.

    Stages that hold no node are dropped and the rest renumbered in order, so a
    plan never has an empty stage between two used ones: stage j of the plan runs
    on the j-th *used* device. With a bandwidth matrix the used rows and columns
    are kept.
    """
    specs = normalize_devices(devices)
    ev = evaluate(graph, assignment, specs, bandwidth)
    if not ev.valid:
        raise PlanError("cannot make a plan of an invalid assignment: " + "; ".join(ev.violations))
    compact, used = _compact(assignment)
    order = {v: i for i, v in enumerate(nx.lexicographical_topological_sort(graph))}
    stages = []
    for j, k in enumerate(used):
        members = sorted((v for v, s in compact.items() if s == j), key=order.__getitem__)
        sc = ev.stages[k]
        stages.append(
            StageInfo(
                device=specs[k].name,
                nodes=sc.nodes,
                time=sc.time,
                in_bytes=sc.in_bytes,
                cost=sc.cost,
                param_bytes=sc.param_bytes,
                act_bytes=sc.act_bytes,
                first=members[0] if members else None,
                last=members[-1] if members else None,
            )
        )
    used_specs = [specs[k] for k in used]
    bw: Bandwidth = bandwidth
    if not isinstance(bandwidth, int | float):
        bw = [[float(bandwidth[a][b]) for b in used] for a in used]
    lb = min(float(lower_bound), ev.bottleneck)
    gap = 0.0 if ev.bottleneck <= 0 else max(0.0, (ev.bottleneck - lb) / ev.bottleneck)
    return Plan(
        assignment=compact,
        device_specs=used_specs,
        stages=stages,
        bottleneck=ev.bottleneck,
        comm_bytes=ev.comm_bytes,
        lower_bound=lb,
        gap=gap,
        status=status,
        solver=solver,
        solve_time=solve_time,
        objective=objective,
        bandwidth=bw,
        chunks=chunks,
        signature=list(signature),
        model=model,
        meta=dict(meta or {}),
    )
