"""The step time and memory of a training schedule: an event simulation of its actions.

Plain numbers in (per-stage seconds and bytes), a `Simulation` out; no torch. The actions
come from `partitioner.planner.schedules` (docs/schedules.md), the cost model from
docs/architecture.md ("Training plans"): forward ``sum(time) / speed``, backward
``sum(bwd_time) / speed`` and transfer ``in_bytes / bandwidth`` each way, per stage and
micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from partitioner.planner.schedules import Action, actions, timings

__all__ = ["Event", "Simulation", "simulate"]


@dataclass(frozen=True)
class Event:
    """One action as it ran: on `device`, from `start` to `end` seconds into the step."""

    device: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    """What one training step of a schedule takes.

    `step_time`: seconds from the first forward to the last backward (or weight-grad).
    `peak_bytes[d]`: device d's parameters plus the most activation bytes it holds at once.
    `busy[d]`: seconds device d computes. `events`: every action, by start time.
    """

    step_time: float
    peak_bytes: tuple[int, ...]
    busy: tuple[float, ...]
    events: tuple[Event, ...]

    @property
    def bubble(self) -> float:
        """The fraction of device time spent idle: ``1 - sum(busy) / (K * step_time)``."""
        if self.step_time <= 0:
            return 0.0
        return 1.0 - sum(self.busy) / (len(self.busy) * self.step_time)


def simulate(
    forward: Sequence[float],
    backward: Sequence[float],
    schedule: str | Sequence[Sequence[Action]],
    chunks: int,
    *,
    num_devices: int | None = None,
    virtual_stages: int = 1,
    send: Sequence[float] | None = None,
    act_bytes: Sequence[int] | None = None,
    param_bytes: Sequence[int] | None = None,
    weight_grad: Sequence[float] | None = None,
) -> Simulation:
    """Simulate one training step of `chunks` micro-batches.

    `forward[s]` and `backward[s]` are stage s's seconds per micro-batch (its full backward),
    for ``K * virtual_stages`` stages, stage s on device ``s % K``; `num_devices` (K) defaults
    to ``len(forward) // virtual_stages``. `schedule` is a name in `SCHEDULES`, or each
    device's list of actions (in any layout of stages on devices; `num_devices` then follows
    from it and `virtual_stages` is not used).

    `send[s]` is the seconds to move a micro-batch across the boundary between stage s and
    s + 1, forward and (its gradient) backward alike: overlapped with compute, and free
    between two stages on one device. `act_bytes[s]` is what a micro-batch keeps alive on
    stage s from its forward until its backward (until its weight-grad in a schedule with "W"
    actions); `param_bytes[s]` is stage s's weights.

    In a schedule with "W" actions (``zero-bubble``) the backward is split: "B" (input-grad)
    takes ``backward[s] - weight_grad[s]`` and "W" takes ``weight_grad[s]``, by default half
    of `backward` (the zero-bubble paper's equal split). Other schedules ignore `weight_grad`.
    """
    stages = len(forward)
    per_device = _lists(schedule, stages, chunks, num_devices, virtual_stages)
    split = any(a.kind == "W" for ops in per_device for a in ops)
    cost = _Costs.of(forward, backward, send, weight_grad, split)
    done = timings(per_device, cost.duration, lambda boundary: cost.send[boundary])
    events = sorted(
        (Event(d, a, *done[a]) for d, ops in enumerate(per_device) for a in ops),
        key=lambda e: (e.start, e.device),
    )
    acts = _per_stage(act_bytes, stages, "act_bytes")
    params = _per_stage(param_bytes, stages, "param_bytes")
    return Simulation(
        step_time=max((e.end for e in events), default=0.0),
        peak_bytes=tuple(
            _peak(ops, acts, split) + sum(params[s] for s in _stages_of(ops)) for ops in per_device
        ),
        busy=tuple(sum(cost.duration(a) for a in ops) for ops in per_device),
        events=tuple(events),
    )


@dataclass(frozen=True)
class _Costs:
    """Seconds per action, checked: the forward, "B" and "W" of each stage, and each send."""

    forward: tuple[float, ...]
    grad: tuple[float, ...]  # "B": the full backward, or its input-grad half when split
    weight: tuple[float, ...]  # "W"
    send: tuple[float, ...]

    @classmethod
    def of(
        cls,
        forward: Sequence[float],
        backward: Sequence[float],
        send: Sequence[float] | None,
        weight_grad: Sequence[float] | None,
        split: bool,
    ) -> _Costs:
        n = len(forward)
        fwd = _seconds(forward, n, "forward")
        bwd = _seconds(backward, n, "backward")
        gaps = max(n - 1, 0)
        hops = _seconds([0.0] * gaps if send is None else send, gaps, "send", "stage boundary")
        if not split:
            return cls(fwd, bwd, (0.0,) * n, hops)
        w = (
            tuple(b / 2 for b in bwd)
            if weight_grad is None
            else _seconds(weight_grad, n, "weight_grad")
        )
        over = [s for s in range(n) if w[s] > bwd[s]]
        if over:
            s = over[0]
            raise ValueError(
                f"weight_grad is part of backward: stage {s} has weight_grad {w[s]} > "
                f"backward {bwd[s]}"
            )
        return cls(fwd, tuple(b - x for b, x in zip(bwd, w, strict=True)), w, hops)

    def duration(self, a: Action) -> float:
        return {"F": self.forward, "B": self.grad, "W": self.weight}[a.kind][a.stage]


def _seconds(values: Sequence[float], n: int, name: str, each: str = "stage") -> tuple[float, ...]:
    if len(values) != n:
        raise ValueError(f"{name} needs {n} values, one per {each} (got {len(values)})")
    bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"{name} needs finite seconds >= 0 (got {bad[0]})")
    return tuple(float(v) for v in values)


def _per_stage(values: Sequence[int] | None, n: int, name: str) -> tuple[int, ...]:
    if values is None:
        return (0,) * n
    if len(values) != n or any(v < 0 for v in values):
        raise ValueError(f"{name} needs {n} values >= 0, one per stage (got {list(values)})")
    return tuple(int(v) for v in values)


def _stages_of(ops: Sequence[Action]) -> set[int]:
    return {a.stage for a in ops}


def _peak(ops: Sequence[Action], acts: tuple[int, ...], split: bool) -> int:
    """The most activation bytes alive at once on a device that runs `ops` in order: a
    micro-batch's ``acts[s]`` from the forward of stage s until its backward ("W" if split)."""
    release = "W" if split else "B"
    alive = peak = 0
    for a in ops:
        if a.kind == "F":
            alive += acts[a.stage]
            peak = max(peak, alive)
        elif a.kind == release:
            alive -= acts[a.stage]
    return peak


def _lists(
    schedule: str | Sequence[Sequence[Action]],
    stages: int,
    chunks: int,
    num_devices: int | None,
    virtual_stages: int,
) -> Sequence[Sequence[Action]]:
    """Each device's actions: generated for a schedule's name, checked when given."""
    if not isinstance(schedule, str):
        if chunks < 1:
            raise ValueError(f"a schedule needs chunks >= 1 (chunks={chunks})")
        if num_devices is not None and num_devices != len(schedule):
            raise ValueError(f"the schedule has {len(schedule)} devices, not {num_devices}")
        _check_complete(schedule, stages, chunks)
        return schedule
    v = virtual_stages
    if v < 1:
        raise ValueError(f"a schedule needs virtual_stages >= 1 (virtual_stages={v})")
    k = stages // v if num_devices is None else num_devices
    if k * v != stages or k < 1:
        devices = "some devices" if num_devices is None else f"{num_devices} devices"
        raise ValueError(
            f"{stages} stage costs for {devices} x {v} virtual stages: give one per stage, "
            "num_devices * virtual_stages in all"
        )
    return actions(schedule, k, chunks, v)


def _check_complete(per_device: Sequence[Sequence[Action]], stages: int, chunks: int) -> None:
    """A schedule given as lists runs F and B (and W for all or none) of every stage and
    micro-batch once."""
    listed = [a for ops in per_device for a in ops]
    kinds = "FBW" if any(a.kind == "W" for a in listed) else "FB"
    want = {Action(s, k, i) for s in range(stages) for k in kinds for i in range(chunks)}
    if len(listed) != len(want) or set(listed) != want:
        extra = sorted(map(str, set(listed) - want))[:3]
        missing = sorted(map(str, want - set(listed)))[:3]
        raise ValueError(
            f"the schedule must run {kinds} of each of {stages} stages x {chunks} micro-batches "
            f"once: missing {missing}, extra {extra}, {len(listed)} listed for {len(want)}"
        )
