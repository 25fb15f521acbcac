"""Which stages a rank holds, and which of torch's schedules runs them, checked up front.

[Note: virtual stages]
With K ranks and ``V`` virtual stages per rank a plan has ``K * V`` stages and rank ``r``
holds stages ``r, r + K, ..., r + (V - 1) K`` (torch.distributed.pipelining's "loop"
mapping, ``stage % K``; `partitioner.planner.schedules.device_of` is the same rule), so
every stage boundary ``s -> s + 1`` goes from one rank to the next and the last stage is on
rank ``K - 1``. ``gpipe`` and ``1f1b`` run one stage per rank (``ScheduleGPipe``,
``Schedule1F1B``); ``interleaved-1f1b`` and ``zero-bubble`` run ``V >= 1`` per rank
(``ScheduleInterleaved1F1B``, ``ScheduleInterleavedZeroBubble``: ZB1P, whose backward is
split into input-grad and weight-grad halves). The names are the planner's
(`partitioner.planner.schedules.SCHEDULES`), so a plan's schedule runs here by name.

torch checks some of these constraints deep inside a schedule's constructor (a bare
``ValueError`` about "rounds"), others not at all (a world size that does not fit the stage
count fails in the first send); `check_schedule` says each one first, with the fix.
"""

from __future__ import annotations

from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from partitioner.errors import ModelSplitError

__all__ = ["LOOPED", "SCHEDULES", "check_schedule", "stages_of"]

#: torch's schedule class for each of the planner's schedule names
SCHEDULES: dict[str, type] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "zero-bubble": ScheduleInterleavedZeroBubble,
}
#: the schedules that hold several stages per rank (torch's ``PipelineScheduleMulti``)
LOOPED = ("interleaved-1f1b", "zero-bubble")


def stages_of(rank: int, ranks: int, num_stages: int) -> tuple[int, ...]:
    """The stages rank `rank` of `ranks` holds: ``rank, rank + ranks, ...``."""
    return tuple(range(rank, num_stages, ranks))


def check_schedule(
    schedule: str, ranks: int, num_stages: int, chunks: int, virtual_stages: int = 1
) -> None:
    """ValueError / ModelSplitError, naming the fix, for a schedule that cannot run
    `num_stages` stages on `ranks` processes with `virtual_stages` each in `chunks`
    micro-batches."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} ({schedule!r})")
    if isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"chunks must be a positive integer ({chunks} < 1)")
    if isinstance(virtual_stages, bool) or virtual_stages < 1:
        raise ValueError(f"virtual_stages must be a positive integer ({virtual_stages} < 1)")
    if schedule not in LOOPED and virtual_stages != 1:
        raise ValueError(
            f"{schedule} runs one stage per rank (virtual_stages={virtual_stages}): use "
            f"--schedule {' or '.join(LOOPED)} for several stages per rank"
        )
    if ranks * virtual_stages != num_stages:
        raise ModelSplitError(_mismatch(ranks, num_stages, virtual_stages))
    if schedule == "1f1b" and chunks < ranks:
        raise ValueError(
            f"1f1b needs at least one micro-batch per stage ({chunks} chunks < "
            f"{num_stages} stages): use --chunks {ranks} or more, or gpipe"
        )
    rounds = max(1, chunks // ranks)
    if schedule in LOOPED and chunks % rounds:
        raise ValueError(
            f"{schedule} runs micro-batches in rounds of {chunks // rounds}, so chunks must be "
            f"a multiple of max(1, chunks // ranks) = {rounds}, as torch's "
            f"{SCHEDULES[schedule].__name__} requires (chunks={chunks}, ranks={ranks}): use "
            f"a multiple of {ranks}, or fewer than {2 * ranks} chunks"
        )


def _mismatch(ranks: int, num_stages: int, v: int) -> str:
    """What to launch, or how to re-plan, when ``ranks * v`` is not the stage count."""
    held = f"{ranks} processes" + (f" x {v} virtual stages = {ranks * v}" if v > 1 else "")
    fixes = []
    if num_stages % v == 0:
        fixes.append(f"launch {num_stages // v} processes (--nproc-per-node={num_stages // v})")
    if v > 1:
        fixes.append(f"launch {num_stages} processes with --virtual-stages 1")
    if num_stages % ranks == 0 and num_stages // ranks not in (1, v):
        fixes.append(f"keep {ranks} with --virtual-stages {num_stages // ranks}")
    fixes.append(f"re-plan for {ranks * v} devices")
    return f"the plan has {num_stages} stages but {held} run it: " + ", or ".join(fixes)
