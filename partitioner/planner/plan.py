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
from partitioner.planner.links import check_links
from partitioner.planner.planfile import read_document
from partitioner.planner.schema import INFERENCE, SCHEMA, SCHEMA_2, STATUSES, check

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

    A training plan (``schedule`` set: docs/planner.md, "Training plans") also has
    ``virtual_stages`` (V: ``K * V`` stages on its K devices, stage s on
    ``device_specs[s % K]``; `devices` names each stage's), ``checkpoint``
    (recomputation), ``step_time`` (predicted seconds per step), ``peak_memory`` (bytes
    per device) and ``notes`` (why this schedule); its ``lower_bound`` and ``gap`` are of
    the step time. An inference plan leaves them at
    ``None``, 1, False, None, None and [].
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
    schedule: str | None = None
    virtual_stages: int = 1
    checkpoint: bool = False
    step_time: float | None = None
    peak_memory: list[int] | None = None
    notes: list[str] = field(default_factory=list)

    # -- views ---------------------------------------------------------------
    @property
    def devices(self) -> list[str]:
        """The device of each stage, in stage order: with ``V = virtual_stages > 1`` device d
        runs stages d, d + K, ... and is named V times (`device_names` lists each once)."""
        return [s.device for s in self.stages]

    @property
    def device_names(self) -> list[str]:
        """The K devices the plan uses, each once, in order (``device_specs``' names)."""
        return [d.name for d in self.device_specs]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_devices(self) -> int:
        return len(self.device_specs)

    def on_devices(self, devices: Sequence[DeviceSpec]) -> Plan:
        """The same assignment with ``devices[j]`` in place of the plan's j-th device (stage
        j with one stage per device; figures kept as planned).

        More devices than the plan uses is the list the plan was made from, where the
        planner left some unused: the plan keeps its devices by name when every one is
        offered, else takes the first ``num_devices``.
        """
        k = self.num_devices
        if len(devices) > k:
            by_name = {d.name: d for d in devices}
            named = [by_name.get(name) for name in self.device_names]
            kept = [d for d in named if d is not None]
            devices = kept if len(kept) == k else list(devices[:k])
        if len(devices) != k:
            unit = "stage" if self.virtual_stages == 1 else "device"
            raise PlanError(
                f"the plan has {k} {unit}s but {len(devices)} devices were given; "
                f"give one device per {unit} or re-plan for these devices"
            )
        stages = [replace(s, device=devices[j % k].name) for j, s in enumerate(self.stages)]
        return replace(self, device_specs=list(devices), stages=stages)

    def stage_nodes(self, j: int) -> list[str]:
        return [v for v, k in self.assignment.items() if k == j]

    # -- (de)serialisation ---------------------------------------------------
    def training_fields(self) -> dict[str, Any]:
        """The fields `modelsplit.plan/2` added, as the plan file writes them."""
        return {
            "schedule": self.schedule,
            "virtual_stages": self.virtual_stages,
            "checkpoint": self.checkpoint,
            "step_time": self.step_time,
            "peak_memory": None if self.peak_memory is None else list(self.peak_memory),
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        """The plan file's fields: a `modelsplit.plan/1` document when the training fields
        are at their inference defaults ([Note: plan schema versions]), else version 2."""
        extra = self.training_fields()
        version = SCHEMA if extra == INFERENCE else SCHEMA_2
        notes = extra.pop("notes")
        data = {
            "schema": version,
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
            **(extra if version == SCHEMA_2 else {}),
            "signature": self.signature,
            "devices": [d.to_dict() for d in self.device_specs],
            "stages": [asdict(s) for s in self.stages],
            "assignment": dict(self.assignment),
            **({"notes": notes} if version == SCHEMA_2 else {}),
            "meta": self.meta,
        }
        return data

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
    check_links(fields)
    plain = {k: v for k, v in fields.items() if k not in ("schema", "devices", "stages")}
    return Plan(
        device_specs=[DeviceSpec(**d) for d in fields["devices"]],
        stages=[StageInfo(**s) for s in fields["stages"]],
        **plain,
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
