"""Schedules: the GPipe clock cycles and their grid; the training schedules' actions, checked
against torch.distributed.pipelining's own."""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from partitioner.planner.schedules import timings
from runtime.schedule import (
    SCHEDULES,
    Action,
    action,
    actions,
    clock_cycles,
    format_grid,
    format_schedule,
)


def test_clock_cycles_small() -> None:
    assert list(clock_cycles(3, 2)) == [
        [(0, 0)],
        [(1, 0), (0, 1)],
        [(2, 0), (1, 1)],
        [(2, 1)],
    ]


@pytest.mark.parametrize(("m", "n"), [(1, 1), (1, 4), (4, 1), (3, 3), (8, 2), (2, 5)])
def test_clock_cycles_cover_every_task_once_in_dependency_order(m: int, n: int) -> None:
    cycles = list(clock_cycles(m, n))
    assert len(cycles) == m + n - 1
    when = {task: k for k, cycle in enumerate(cycles) for task in cycle}
    assert sorted(when) == [(i, j) for i in range(m) for j in range(n)]
    assert sum(len(c) for c in cycles) == m * n
    for (i, j), k in when.items():
        assert k == i + j
        if j > 0:
            assert when[(i, j - 1)] < k
    for cycle in cycles:
        stages = [j for _, j in cycle]
        assert stages == sorted(set(stages))  # one task per stage, listed by stage


def test_clock_cycles_rejects_empty() -> None:
    with pytest.raises(ValueError, match="m >= 1"):
        list(clock_cycles(0, 2))


def test_action_reads_like_pipelining() -> None:
    assert action(i=0, j=1) == "1F0"


def test_format_schedule_grid() -> None:
    assert format_schedule(clock_cycles(4, 3)) == "\n".join(
        [
            "step  stage0  stage1  stage2",
            "   0  0F0",
            "   1  0F1     1F0",
            "   2  0F2     1F1     2F0",
            "   3  0F3     1F2     2F1",
            "   4          1F3     2F2",
            "   5                  2F3",
        ]
    )


def test_format_schedule_rejects_two_tasks_on_one_stage() -> None:
    with pytest.raises(ValueError, match="stage 0 has two tasks in step 0"):
        format_schedule([[(0, 0), (1, 0)]])


def test_format_schedule_wide_cells_and_explicit_stages() -> None:
    grid = format_schedule(clock_cycles(12, 1), n=2)
    assert grid.splitlines()[0] == "step  stage0  stage1"
    assert grid.splitlines()[-1] == "  11  0F11"


# The training schedules: per-device actions (partitioner.planner.schedules, re-exported).

GRID_1F1B = """\
step  dev0  dev1  dev2
   0  0F0
   1  0F1   1F0
   2  0F2   1F1   2F0
   3              2B0
   4        1B0   2F1
   5  0B0   1F2   2B1
   6  0F3   1B1   2F2
   7  0B1   1F3   2B2
   8        1B2   2F3
   9  0B2         2B3
  10        1B3
  11  0B3"""

CASES = [
    ("gpipe", 1, 1, 1),
    ("gpipe", 3, 5, 1),
    ("1f1b", 1, 3, 1),
    ("1f1b", 3, 3, 1),
    ("1f1b", 4, 9, 1),
    ("interleaved-1f1b", 2, 4, 2),
    ("interleaved-1f1b", 4, 8, 3),
    ("interleaved-1f1b", 4, 3, 2),
    ("interleaved-1f1b", 3, 1, 1),
    ("zero-bubble", 4, 8, 1),
    ("zero-bubble", 3, 5, 1),
    ("zero-bubble", 2, 4, 3),
]


def test_schedule_names() -> None:
    assert SCHEDULES == ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")


def test_action_prints_like_pipelining() -> None:
    assert str(Action(1, "F", 0)) == repr(Action(1, "F", 0)) == "1F0"
    assert Action(2, "W", 11) == Action(2, "W", 11)
    assert [Action(0, "B", 3)] == [Action(0, "B", 3)]
    with pytest.raises(ValueError, match="one of"):
        Action(0, "I", 0)
    with pytest.raises(ValueError, match="stage=-1"):
        Action(-1, "F", 0)


def test_actions_small_1f1b() -> None:
    assert [[str(a) for a in ops] for ops in actions("1f1b", 2, 3)] == [
        ["0F0", "0F1", "0B0", "0F2", "0B1", "0B2"],
        ["1F0", "1B0", "1F1", "1B1", "1F2", "1B2"],
    ]
    assert format_grid(actions("1f1b", 3, 4)) == GRID_1F1B


@pytest.mark.parametrize(("schedule", "k", "m", "v"), CASES)
def test_actions_run_every_task_once_on_its_device(schedule: str, k: int, m: int, v: int) -> None:
    per_device = actions(schedule, num_devices=k, chunks=m, virtual_stages=v)
    assert len(per_device) == k
    kinds = "FBW" if schedule == "zero-bubble" else "FB"
    listed = [a for ops in per_device for a in ops]
    want = {Action(s, c, i) for s in range(k * v) for c in kinds for i in range(m)}
    assert len(listed) == len(want) and set(listed) == want
    for d, ops in enumerate(per_device):
        assert all(a.stage % k == d for a in ops)
        for s in range(d, k * v, k):  # each stage meets its micro-batches in order
            for c in kinds:
                assert [a.microbatch for a in ops if (a.stage, a.kind) == (s, c)] == list(range(m))
    timings(per_device, lambda a: 1.0)  # the order does not deadlock


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("pipedream", 2, 2), "unknown schedule 'pipedream'"),
        (("gpipe", 0, 2), r"num_devices=0, chunks=2"),
        (("gpipe", 2, 2, 2), r"one stage per device \(virtual_stages=2\)"),
        (("1f1b", 4, 3), r"chunks >= num_devices.*Schedule1F1B.*chunks=3, num_devices=4"),
        (("interleaved-1f1b", 4, 9, 2), r"max\(1, chunks // num_devices\) = 2.*chunks=9"),
        (("zero-bubble", 4, 9, 1), r"= 2.*ScheduleInterleavedZeroBubble.*chunks=9"),
    ],
)
def test_actions_reject_bad_arguments(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        actions(*args)


def test_timings_reject_bad_orders() -> None:
    with pytest.raises(ValueError, match="deadlocks, each device waiting: device 0 at 0B0"):
        timings([[Action(0, "B", 0), Action(0, "F", 0)]], lambda a: 1.0)
    with pytest.raises(ValueError, match="0B0 needs 1B0, which no device runs"):
        timings([[Action(0, "F", 0), Action(0, "B", 0)], [Action(1, "F", 0)]], lambda a: 1.0)
    with pytest.raises(ValueError, match="0F0 is listed twice"):
        timings([[Action(0, "F", 0)], [Action(0, "F", 0)]], lambda a: 1.0)
    with pytest.raises(ValueError, match="stage 0 has actions on devices 0 and 1"):
        timings([[Action(0, "F", 0)], [Action(0, "F", 1)]], lambda a: 1.0)


def test_runtime_reexports_the_planner_schedules() -> None:
    import runtime.schedule
    from partitioner.planner import schedules

    for name in ("SCHEDULES", "Action", "actions", "format_grid"):
        assert getattr(runtime.schedule, name) is getattr(schedules, name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        runtime.schedule.nope  # noqa: B018


def test_import_runtime_does_not_load_the_planner() -> None:
    code = (
        "import sys, runtime\n"
        "assert 'partitioner.planner' not in sys.modules\n"
        "from runtime.schedule import actions\n"
        "assert actions('gpipe', 1, 1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# torch.distributed.pipelining's own schedules, built on stand-in stages: a schedule reads
# only a stage's indices (and `submod`, to refuse torch.compile'd ones), so no process group
# is needed to get its `pipeline_order` (rank -> actions, None for an idle step).


def _fake_stages(k: int, v: int) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            num_stages=k * v, group_size=k, group_rank=0, stage_index=j * k, submod=None
        )
        for j in range(v)
    ]


def _torch_order(schedule: str, k: int, m: int, v: int) -> list[list[str]]:
    """Each rank's compute actions in torch's order: idle steps and REDUCE_GRAD dropped,
    torch's "I" (backward-input) written as our zero-bubble "B"."""
    pipelining = pytest.importorskip("torch.distributed.pipelining.schedules")
    cls = {
        "gpipe": pipelining.ScheduleGPipe,
        "1f1b": pipelining.Schedule1F1B,
        "interleaved-1f1b": pipelining.ScheduleInterleaved1F1B,
        "zero-bubble": pipelining.ScheduleInterleavedZeroBubble,
    }[schedule]
    stages = _fake_stages(k, v)
    order = cls(stages[0] if schedule in ("gpipe", "1f1b") else stages, m).pipeline_order
    assert order is not None and sorted(order) == list(range(k))
    out = []
    for rank in range(k):
        compute = [a for a in order[rank] if a is not None and a.computation_type.value in "FBIW"]
        out.append(
            [
                f"{a.stage_index}{a.computation_type.value.replace('I', 'B')}{a.microbatch_index}"
                for a in compute
            ]
        )
    return out


def _ours(schedule: str, k: int, m: int, v: int) -> list[list[str]]:
    return [[str(a) for a in ops] for ops in actions(schedule, k, m, v)]


TORCH_CASES = [
    *[("gpipe", k, m, 1) for k, m in [(1, 1), (2, 3), (3, 6), (4, 4), (4, 9)]],
    *[
        (name, k, m, v)
        for name in ("interleaved-1f1b", "zero-bubble")
        for k, m, v in [
            (1, 3, 2),
            (2, 2, 1),
            (2, 4, 2),
            (3, 6, 2),
            (4, 8, 2),
            (4, 8, 3),
            (3, 3, 4),
            (4, 10, 2),
            (4, 3, 2),
            (4, 7, 2),
            (4, 12, 1),
            (2, 1, 2),
        ]
    ],
]


@pytest.mark.parametrize(("schedule", "k", "m", "v"), TORCH_CASES)
def test_actions_match_torch_pipelining(schedule: str, k: int, m: int, v: int) -> None:
    assert _ours(schedule, k, m, v) == _torch_order(schedule, k, m, v)


@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 2), (2, 5), (3, 6), (4, 4), (4, 11)])
def test_1f1b_matches_torch_pipelining(k: int, m: int) -> None:
    ours, theirs = _ours("1f1b", k, m, 1), _torch_order("1f1b", k, m, 1)
    assert ours[: k - 1] == theirs[: k - 1]
    # torch 2.13's Schedule1F1B._get_pipeline_order numbers the last rank's forwards 1..m
    # (its forward counter starts at 0 and is bumped before use when there is no warm-up);
    # what Schedule1F1B runs there (`_step_microbatches`: min(m, k - rank) forwards, then a
    # backward and a forward in turn) is F0, B0, F1, B1, ...: ours.
    renumbered = [_renumber_forward(a) for a in theirs[k - 1]]
    assert ours[k - 1] in (theirs[k - 1], renumbered)


def _renumber_forward(a: str) -> str:
    match = re.fullmatch(r"(\d+)([FBW])(\d+)", a)
    assert match is not None, a
    stage, kind, mb = match.groups()
    return f"{stage}{kind}{int(mb) - 1 if kind == 'F' else mb}"


@pytest.mark.parametrize(
    ("schedule", "k", "m", "v"),
    [("1f1b", 4, 3, 1), ("interleaved-1f1b", 4, 9, 2), ("zero-bubble", 4, 9, 1)],
)
def test_actions_refuse_what_torch_refuses(schedule: str, k: int, m: int, v: int) -> None:
    with pytest.raises(ValueError):
        actions(schedule, k, m, v)
    with pytest.raises(ValueError):
        _torch_order(schedule, k, m, v)
