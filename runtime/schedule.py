"""Schedules as data: the GPipe clock cycles `Pipeline` runs, and the training schedules.

`clock_cycles` and `backward_cycles` are the forward and backward clock cycles of the
threaded pipeline (`runtime.pipeline`, `runtime.backward`), `format_schedule` prints them.
The training schedules (``gpipe``, ``1f1b``, ``interleaved-1f1b``, ``zero-bubble``: `Action`,
`actions`, `check_schedule`, `format_grid`, `SCHEDULES`; docs/schedules.md), which
`Pipeline.train_step` runs, live in the torch-free planner core,
`partitioner.planner.schedules`, so that `partitioner.planner.simulation` can time them; they
are re-exported here, loaded on first use so that ``import runtime`` does not load the planner.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partitioner.planner.schedules import (
        SCHEDULES,
        Action,
        actions,
        check_schedule,
        format_grid,
    )

__all__ = [
    "SCHEDULES",
    "Action",
    "Schedule",
    "action",
    "actions",
    "backward_cycles",
    "check_schedule",
    "clock_cycles",
    "format_grid",
    "format_schedule",
]

_PLANNED = ("SCHEDULES", "Action", "actions", "check_schedule", "format_grid")


def __getattr__(name: str) -> Any:
    if name in _PLANNED:
        from partitioner.planner import schedules

        return getattr(schedules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# One clock cycle: the (i, j) tasks that may run at the same time,
# i the micro-batch index (0..m-1), j the stage index (0..n-1).
Schedule = list[list[tuple[int, int]]]


def clock_cycles(m: int, n: int) -> Iterator[list[tuple[int, int]]]:
    """Yield the tasks of each clock cycle of GPipe's forward pass, m micro-batches, n stages.

    In cycle k, stage j runs micro-batch k - j: m + n - 1 cycles in all. For m=4, n=3::

        k  (i,j)  (i,j)  (i,j)
        -  -----  -----  -----
        0  (0,0)
        1  (1,0)  (0,1)
        2  (2,0)  (1,1)  (0,2)
        3  (3,0)  (2,1)  (1,2)
        4         (3,1)  (2,2)
        5                (3,2)

    Within a cycle tasks are listed by stage. Task (i, j) depends on (i, j-1), which is in
    the cycle before, and stage j meets its micro-batches in order 0..m-1.
    """
    if m < 1 or n < 1:
        raise ValueError(f"a schedule needs m >= 1 and n >= 1 (m={m}, n={n})")
    for k in range(m + n - 1):
        yield [(k - j, j) for j in range(max(0, k - m + 1), min(k + 1, n))]


def backward_cycles(m: int, n: int) -> Iterator[list[tuple[int, int]]]:
    """Yield the clock cycles of the pipelined backward (`runtime.backward`): the forward's
    with the stages reversed. In cycle k, stage j works on micro-batch k - (n - 1 - j), so
    task (i, j) follows (i, j + 1) of the cycle before. For m=3, n=2::

        k  (i,j)  (i,j)
        0  (0,1)
        1  (1,1)  (0,0)
        2  (2,1)  (1,0)
        3         (2,0)
    """
    for cycle in clock_cycles(m, n):
        yield [(i, n - 1 - j) for i, j in cycle]


def action(i: int, j: int, phase: str = "F") -> str:
    """A task as torch.distributed.pipelining writes an action: stage, phase (F(orward) or
    B(ackward)), micro-batch."""
    return f"{j}{phase}{i}"


def format_schedule(
    cycles: Iterable[list[tuple[int, int]]], n: int | None = None, phase: str = "F"
) -> str:
    """Draw a schedule as a step x stage grid, one row per clock cycle.

    >>> print(format_schedule(clock_cycles(3, 2)))
    step  stage0  stage1
       0  0F0
       1  0F1     1F0
       2  0F2     1F1
       3          1F2
    """
    rows = [list(cycle) for cycle in cycles]
    if n is None:
        n = 1 + max((j for row in rows for _, j in row), default=-1)
    width = max(6, *(len(action(i, j, phase)) + 2 for row in rows for i, j in row)) if rows else 6
    header = "step  " + "".join(f"stage{j}".ljust(width + 2) for j in range(n))
    lines = [header.rstrip()]
    for k, row in enumerate(rows):
        cells = [""] * n
        for i, j in row:
            if cells[j]:
                raise ValueError(
                    f"stage {j} has two tasks in step {k}: {cells[j]}, {action(i, j, phase)}"
                )
            cells[j] = action(i, j, phase)
        line = f"{k:>4}  " + "".join(c.ljust(width + 2) for c in cells)
        lines.append(line.rstrip())
    return "\n".join(lines)
