"""The Plan: an assignment of graph nodes to stages, with its figures, as versioned JSON.

Loading never runs code and never blocks: `planfile` reads the file (a regular file of at
most 64 MiB) as strict JSON, `schema` checks it against the declared table of fields
([Note: plan schema]), and `_check_links` checks the fields that must agree. A malformed
plan is one `PlanError` naming the field and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
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
from partitioner.planner.planfile import read_document
from partitioner.planner.schema import SCHEMA, STATUSES, check, key_path, refusal, shown

__all__ = ["SCHEMA", "STATUSES", "Plan", "StageInfo", "make_plan"]


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
        """The same assignment with stage j on ``devices[j]`` (figures kept as planned).

        More devices than stages is the list the plan was made from, where the planner left
        some unused: stages keep their devices by name when every one is offered, else take
        the first ``num_stages``.
        """
        if len(devices) > self.num_stages:
            by_name = {d.name: d for d in devices}
            named = [by_name.get(name) for name in self.devices]
            kept = [d for d in named if d is not None]
            devices = kept if len(kept) == self.num_stages else list(devices[: self.num_stages])
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
            "stages": [asdict(s) for s in self.stages],
            "assignment": dict(self.assignment),
            "meta": self.meta,
        }

    def to_json(self) -> str:
        """The plan file's text; a figure that is not finite is a PlanError here, not a
        file that `load` would refuse later."""
        try:
            return json.dumps(self.to_dict(), indent=2, allow_nan=False)
        except ValueError as exc:
            raise PlanError(f"the plan holds a figure that is not finite ({exc})") from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.write("\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """The plan `to_dict` gave, checked: PlanError, and only that, when malformed."""
        return _plan_from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """The plan `save` wrote at ``path``: PlanError, and only that, when anything is off."""
        return _plan_from_dict(read_document(path))

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


def _plan_from_dict(data: Any) -> Plan:
    fields = check(data)
    _check_links(fields)
    plain = {k: v for k, v in fields.items() if k not in ("schema", "devices", "stages")}
    return Plan(
        device_specs=[DeviceSpec(**d) for d in fields["devices"]],
        stages=[StageInfo(**s) for s in fields["stages"]],
        **plain,
    )


def _check_links(plan: Mapping[str, Any]) -> None:
    """What the schema's table cannot say: the fields that must agree with one another."""
    devices, stages, n = plan["devices"], plan["stages"], len(plan["stages"])
    if len(devices) != n:
        fix = "list one device per stage in 'devices', in stage order"
        raise refusal("stages", f"lists {n} stages for {len(devices)} devices", fix)
    seen: dict[str, int] = {}
    for k, (device, stage) in enumerate(zip(devices, stages, strict=True)):
        name = device["name"]
        if name in seen:
            problem = f"repeats {shown(name)} (devices[{seen[name]}].name)"
            raise refusal(f"devices[{k}].name", problem, "give each device a name of its own")
        seen[name] = k
        if stage["device"] != name:
            problem = f"is {shown(stage['device'])} but devices[{k}].name is {shown(name)}"
            fix = f"stage {k} runs on devices[{k}]: make the two names agree"
            raise refusal(f"stages[{k}].device", problem, fix)
    used: set[int] = set()
    for node, k in plan["assignment"].items():
        if k >= n:
            fix = "give the index of one of the plan's stages"
            raise refusal("assignment" + key_path(node), f"is {k}, outside 0..{n - 1}", fix)
        used.add(k)
    if len(used) < n:
        problem = f"places no node on stage {min(set(range(n)) - used)}"
        raise refusal("assignment", problem, "place a node on every stage")
    bandwidth = plan["bandwidth"]
    if isinstance(bandwidth, list):
        _check_matrix(bandwidth, n)


def _check_matrix(bandwidth: list[list[float]], n: int) -> None:
    if len(bandwidth) != n or any(len(row) != n for row in bandwidth):
        fix = f"give {n} rows of {n} numbers, [source][destination], one per device"
        raise refusal("bandwidth", f"is not a {n} x {n} matrix", fix)
    for i, row in enumerate(bandwidth):
        for j, value in enumerate(row):
            if i != j and not value > 0:
                fix = "write the bytes/s between two devices, a number > 0"
                raise refusal(f"bandwidth[{i}][{j}]", f"is {shown(value)}", fix)


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
