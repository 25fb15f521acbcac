"""What a plan file's table of fields cannot say: the fields that must agree with one another.

[Note: plan schema] in `partitioner.planner.schema`. Each refusal is one `PlanError` naming
the field and the fix. With ``V = virtual_stages`` a plan has ``K * V`` stages on its ``K``
devices, stage ``s`` on ``devices[s % K]`` (docs/schedules.md); an inference plan has
``V = 1``, so stage k runs on devices[k].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from partitioner.planner.schedules import check_schedule
from partitioner.planner.schema import INFERENCE, key_path, refusal, shown

__all__ = ["check_links"]


def check_links(plan: Mapping[str, Any]) -> None:
    """Refuse a plan whose fields disagree (PlanError naming the field and the fix)."""
    _check_stages(plan)
    n = len(plan["stages"])
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
        _check_matrix(bandwidth, len(plan["devices"]))
    _check_training(plan)


def _check_stages(plan: Mapping[str, Any]) -> None:
    """Unique device names; K * V stages, stage s on devices[s % K]."""
    devices, stages, v = plan["devices"], plan["stages"], plan["virtual_stages"]
    k, n = len(devices), len(stages)
    if n != k * v:
        if v == 1:
            fix = "list one device per stage in 'devices', in stage order"
        else:
            fix = f"list {k} x {v} stages, stage s on devices[s % {k}], or fix virtual_stages"
        raise refusal("stages", f"lists {n} stages for {k} devices x {v} virtual stages", fix)
    seen: dict[str, int] = {}
    for j, device in enumerate(devices):
        name = device["name"]
        if name in seen:
            problem = f"repeats {shown(name)} (devices[{seen[name]}].name)"
            raise refusal(f"devices[{j}].name", problem, "give each device a name of its own")
        seen[name] = j
    for s, stage in enumerate(stages):
        name = devices[s % k]["name"]
        if stage["device"] != name:
            where = f"devices[{s % k}]"
            problem = f"is {shown(stage['device'])} but {where}.name is {shown(name)}"
            fix = f"stage {s} runs on {where}: make the two names agree"
            raise refusal(f"stages[{s}].device", problem, fix)


def _check_matrix(bandwidth: list[list[float]], n: int) -> None:
    if len(bandwidth) != n or any(len(row) != n for row in bandwidth):
        fix = f"give {n} rows of {n} numbers, [source][destination], one per device"
        raise refusal("bandwidth", f"is not a {n} x {n} matrix", fix)
    for i, row in enumerate(bandwidth):
        for j, value in enumerate(row):
            if i != j and not value > 0:
                fix = "write the bytes/s between two devices, a number > 0"
                raise refusal(f"bandwidth[{i}][{j}]", f"is {shown(value)}", fix)


def _check_training(plan: Mapping[str, Any]) -> None:
    """An inference plan (no schedule) keeps the training fields at their defaults; a
    training plan has a step time, one peak per device, and a schedule that runs there."""
    schedule, k = plan["schedule"], len(plan["devices"])
    if schedule is None:
        for name in ("virtual_stages", "checkpoint", "step_time", "peak_memory"):
            if plan[name] != INFERENCE[name] or type(plan[name]) is not type(INFERENCE[name]):
                problem = f"is {shown(plan[name])} in a plan without a schedule"
                fix = f"write {shown(INFERENCE[name])}, or name the plan's training schedule"
                raise refusal(name, problem, fix)
        return
    if plan["step_time"] is None:
        fix = "write the predicted seconds per training step"
        raise refusal("step_time", "is null in a training plan", fix)
    peaks = plan["peak_memory"]
    if peaks is None or len(peaks) != k:
        fix = f"write {k} byte counts, one per device"
        raise refusal("peak_memory", f"is {shown(peaks)} for {k} devices", fix)
    try:
        check_schedule(schedule, k, plan["chunks"], plan["virtual_stages"])
    except ValueError as e:
        fix = "choose a schedule, chunks and virtual_stages that go together"
        raise refusal("schedule", f"{shown(schedule)} does not run here ({e})", fix) from None
