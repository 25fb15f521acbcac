"""Training schedules as data: each device's ordered list of actions (docs/schedules.md).

No torch here: `runtime.schedule` re-exports these names for the runtime, and
`partitioner.planner.simulation` times them. An action is (stage, kind, micro-batch), kind
"F" (forward), "B" (backward; the input-grad half in ``zero-bubble``) or "W" (weight-grad,
``zero-bubble`` only), and prints as torch.distributed.pipelining prints its ``_Action``:
``1F0`` is stage 1's forward of micro-batch 0. With ``V`` virtual stages per device there
are ``K * V`` stages and stage ``s`` lives on device ``s % K``.

The orders are torch.distributed.pipelining's (torch 2.13), so a plan simulated here runs in
the same order there: ``gpipe`` is ``ScheduleGPipe``, ``1f1b`` what ``Schedule1F1B`` runs,
``interleaved-1f1b`` ``ScheduleInterleaved1F1B`` and ``zero-bubble``
``ScheduleInterleavedZeroBubble`` (ZB-H1 with one stage per device, ZB1P with more);
tests/test_schedule.py compares them action by action.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "KINDS",
    "SCHEDULES",
    "Action",
    "actions",
    "check_schedule",
    "device_of",
    "format_grid",
    "timings",
]

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")
KINDS = ("F", "B", "W")
_TORCH = {
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "zero-bubble": "ScheduleInterleavedZeroBubble",
}

#: one list of actions per device, in the order the device runs them
PerDevice = Sequence[Sequence["Action"]]


@dataclass(frozen=True, repr=False)
class Action:
    """One task of a schedule: `kind` ("F", "B" or "W") of `stage` on `microbatch`."""

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"an action's kind is one of {KINDS} ({self.kind!r})")
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(
                f"an action needs stage >= 0 and microbatch >= 0 "
                f"(stage={self.stage}, microbatch={self.microbatch})"
            )

    def __repr__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"


def device_of(stage: int, num_devices: int) -> int:
    """The device stage `stage` lives on: ``stage % num_devices`` (torch's "loop" mapping)."""
    return stage % num_devices


def actions(
    schedule: str, num_devices: int, chunks: int, virtual_stages: int = 1
) -> list[list[Action]]:
    """Each device's actions, in order, for `chunks` micro-batches over `num_devices` devices
    with `virtual_stages` stages each (stage s on device s % num_devices).

    >>> actions("1f1b", num_devices=2, chunks=3)
    [[0F0, 0F1, 0B0, 0F2, 0B1, 0B2], [1F0, 1B0, 1F1, 1B1, 1F2, 1B2]]
    """
    _check(schedule, num_devices, chunks, virtual_stages)
    k, m = num_devices, chunks
    if schedule == "gpipe":
        return [[_f(d, i) for i in range(m)] + [_b(d, i) for i in range(m)] for d in range(k)]
    if schedule == "1f1b":
        return [_one_f_one_b(d, k, m) for d in range(k)]
    zero_bubble = schedule == "zero-bubble"
    return [_looped(d, k, m, virtual_stages, zero_bubble) for d in range(k)]


def check_schedule(schedule: str, num_devices: int, chunks: int, virtual_stages: int = 1) -> None:
    """ValueError, showing the values, unless `actions` can build this schedule (without
    building it: a plan file's chunks may be huge)."""
    _check(schedule, num_devices, chunks, virtual_stages)


def _check(schedule: str, k: int, m: int, v: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    if k < 1 or m < 1 or v < 1:
        raise ValueError(
            f"a schedule needs num_devices, chunks and virtual_stages >= 1 "
            f"(num_devices={k}, chunks={m}, virtual_stages={v})"
        )
    if schedule in ("gpipe", "1f1b") and v != 1:
        raise ValueError(
            f"{schedule} runs one stage per device (virtual_stages={v}): "
            "interleaved-1f1b and zero-bubble take more"
        )
    if schedule == "1f1b" and m < k:
        raise ValueError(
            f"1f1b needs chunks >= num_devices, as torch's Schedule1F1B does "
            f"(chunks={m}, num_devices={k})"
        )
    rounds = max(1, m // k)
    if schedule in ("interleaved-1f1b", "zero-bubble") and m % rounds:
        raise ValueError(
            f"{schedule} needs chunks to be a multiple of max(1, chunks // num_devices) = "
            f"{rounds}, as torch's {_TORCH[schedule]} does (chunks={m}, num_devices={k}); "
            "a multiple of num_devices, or fewer than 2 * num_devices, always is"
        )


def _f(stage: int, i: int) -> Action:
    return Action(stage, "F", i)


def _b(stage: int, i: int) -> Action:
    return Action(stage, "B", i)


def _one_f_one_b(d: int, k: int, m: int) -> list[Action]:
    """Device d's 1F1B order as Schedule1F1B runs it: k - d forwards, then a backward and a
    forward in turn, then the backwards left."""
    warmup = min(m, k - d)
    ops = [_f(d, i) for i in range(warmup)]
    for i in range(m):
        ops.append(_b(d, i))
        if warmup + i < m:
            ops.append(_f(d, warmup + i))
    return ops


def _looped(d: int, k: int, m: int, v: int, zero_bubble: bool) -> list[Action]:
    """Device d's order in torch's interleaved schedules (``_get_1f1b_rank_ops``).

    Micro-batches go in rounds of ``m // max(1, m // k)``; the forward of step `op` is on
    local stage ``(op // per_round) % v``, the backward of step `op` (from step `warmup` on)
    on local stage ``v - 1 - ((op - warmup) // per_round) % v``. After `warmup` forwards each
    step does one forward and one backward, then the backwards left. In zero-bubble, once d
    has done d backwards, each backward is followed by the weight-grad of the oldest one.
    """
    per_round = m // max(1, m // k)
    total = m * v
    warmup = min((v - 1) * per_round + (1 if zero_bubble else 2) * (k - 1 - d), total)
    done: dict[tuple[str, int], int] = {}
    pending: deque[Action] = deque()
    ops: list[Action] = []

    def emit(kind: str, stage: int) -> Action:
        i = done.get((kind, stage), 0)
        done[kind, stage] = i + 1
        ops.append(Action(stage, kind, i))
        return ops[-1]

    for op in range(total + warmup):
        if op < total:
            emit("F", (op // per_round) % v * k + d)
        if op >= warmup:
            b = emit("B", (v - 1 - (op - warmup) // per_round % v) * k + d)
            pending.append(b)
            if zero_bubble and op - warmup >= d:
                emit("W", pending.popleft().stage)
    while zero_bubble and pending:
        emit("W", pending.popleft().stage)
    return ops


def _needs(a: Action, num_stages: int) -> list[tuple[Action, int | None]]:
    """What `a` waits for: (action, the stage boundary crossed, if any).

    F(s, i) needs F(s-1, i) across boundary s-1; B(s, i) needs F(s, i) and B(s+1, i) across
    boundary s; W(s, i) needs B(s, i).
    """
    s, i = a.stage, a.microbatch
    if a.kind == "F":
        return [(_f(s - 1, i), s - 1)] if s > 0 else []
    if a.kind == "W":
        return [(_b(s, i), None)]
    after = [(_b(s + 1, i), s)] if s + 1 < num_stages else []
    return [(_f(s, i), None), *after]


def timings(
    per_device: PerDevice,
    duration: Callable[[Action], float],
    send: Callable[[int], float] = lambda boundary: 0.0,
) -> dict[Action, tuple[float, float]]:
    """(start, end) of every action: each device runs its list in order, an action starts when
    its device is free and what it needs is done. Crossing stage boundary s (stage s to s + 1,
    either way) between two devices takes ``send(s)`` seconds, which occupy neither device.

    ValueError for an action listed twice, a stage on two devices, an action whose input no
    device runs, or an order that deadlocks.
    """
    home = _homes(per_device)
    needs = {a: _needs(a, 1 + max(home, default=-1)) for ops in per_device for a in ops}
    for a, wanted in needs.items():
        for need, _ in wanted:
            if need not in needs:
                raise ValueError(f"{a} needs {need}, which no device runs")
    done: dict[Action, tuple[float, float]] = {}
    heads, free = [0] * len(per_device), [0.0] * len(per_device)
    while len(done) < len(needs):
        moved = False
        for d, ops in enumerate(per_device):
            while heads[d] < len(ops) and all(n in done for n, _ in needs[ops[heads[d]]]):
                a = ops[heads[d]]
                ready = [
                    done[n][1] + (0.0 if b is None or home[b] == home[b + 1] else send(b))
                    for n, b in needs[a]
                ]
                done[a] = (start := max([free[d], *ready]), start + duration(a))
                free[d], heads[d], moved = done[a][1], heads[d] + 1, True
        if not moved:
            stuck = [
                f"device {d} at {ops[h]}"
                for d, (h, ops) in enumerate(zip(heads, per_device, strict=True))
                if h < len(ops)
            ]
            raise ValueError(f"the schedule deadlocks, each device waiting: {', '.join(stuck)}")
    return done


def _homes(per_device: PerDevice) -> dict[int, int]:
    """Stage -> the device that runs it; ValueError for an action listed twice or a stage
    on two devices."""
    home: dict[int, int] = {}
    seen: set[Action] = set()
    for d, ops in enumerate(per_device):
        for a in ops:
            if a in seen:
                raise ValueError(f"{a} is listed twice")
            seen.add(a)
            if home.setdefault(a.stage, d) != d:
                raise ValueError(f"stage {a.stage} has actions on devices {home[a.stage]} and {d}")
    return home


def format_grid(per_device: PerDevice) -> str:
    """Draw a schedule as a step x device grid, every action one step long and started as
    soon as its device and inputs allow (as torch's ``_format_pipeline_order`` lays it out).

    >>> print(format_grid(actions("gpipe", num_devices=2, chunks=2)))
    step  dev0  dev1
       0  0F0
       1  0F1   1F0
       2        1F1
       3        1B0
       4  0B0   1B1
       5  0B1
    """
    steps = timings(per_device, lambda a: 1.0)
    last = round(max((end for _, end in steps.values()), default=0.0))
    rows = [[""] * len(per_device) for _ in range(last)]
    for d, ops in enumerate(per_device):
        for a in ops:
            rows[round(steps[a][0])][d] = str(a)
    width = max([len(f"dev{len(per_device) - 1}"), *(len(str(a)) for a in steps)])
    lines = ["step  " + "  ".join(f"dev{d}".ljust(width) for d in range(len(per_device)))]
    lines += [f"{k:>4}  " + "  ".join(c.ljust(width) for c in row) for k, row in enumerate(rows)]
    return "\n".join(line.rstrip() for line in lines)
