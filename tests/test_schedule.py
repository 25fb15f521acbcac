"""The GPipe schedule: clock cycles and their grid."""

from __future__ import annotations

import pytest

from runtime.schedule import action, clock_cycles, format_schedule


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
