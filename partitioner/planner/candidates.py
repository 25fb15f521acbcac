"""The candidates of a training solve: which schedules, micro-batch counts, virtual stages
and recomputation the options allow ([Note: training solve] in `partitioner.planner.training`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import networkx as nx

from partitioner.planner.schedules import SCHEDULES, check_schedule
from partitioner.planner.trainplan import FLAT, Choice

__all__ = [
    "AUTO",
    "AUTO_CHUNKS",
    "AUTO_VIRTUAL",
    "check_bwd",
    "choices",
    "chunk_options",
    "inference_chunks",
    "is_training_graph",
]

AUTO = "auto"
#: V tried by ``virtual_stages="auto"`` for the interleaved schedules
AUTO_VIRTUAL = (1, 2)
#: M tried by ``chunks="auto"``: these multiples of the device count that fit the batch
AUTO_CHUNKS = (1, 2, 4)


def choices(
    graph: nx.DiGraph,
    num_devices: int,
    schedule: str | Sequence[str] = AUTO,
    chunks: int | str | None = None,
    virtual_stages: int | str = AUTO,
    checkpoint: bool | str = AUTO,
    batch_size: int | None = None,
    limited: bool | None = None,
) -> list[Choice]:
    """The candidates the options allow, in a fixed order (ValueError for bad options).

    ``schedule`` is ``"auto"`` (all of `SCHEDULES`), one name, or a list of names (the
    schedules a runtime runs). ``checkpoint="auto"`` tries recomputation only with a memory
    limit (``limited``; without one it only adds work), ``virtual_stages="auto"`` tries
    `AUTO_VIRTUAL` for the interleaved schedules, ``chunks="auto"`` `chunk_options`.
    """
    names = _schedules(schedule, virtual_stages)
    if checkpoint != AUTO and not isinstance(checkpoint, bool):
        raise ValueError(f"checkpoint must be 'auto', True or False ({checkpoint!r})")
    if checkpoint == AUTO:
        ckpts: tuple[bool, ...] = (False, True) if limited is None or limited else (False,)
    else:
        ckpts = (bool(checkpoint),)
    out: list[Choice] = []
    for m in chunk_options(graph, num_devices, chunks, batch_size):
        for name in names:
            for v in _virtual(name, virtual_stages, num_devices, graph.number_of_nodes()):
                for k in _device_counts(num_devices) if v == 1 else (num_devices,):
                    if _runs(name, k, m, v):
                        out.extend(Choice(name, m, v, ck, k) for ck in ckpts)
    if not out:
        raise ValueError(
            f"no training schedule runs on {num_devices} devices with these options "
            f"(schedule={schedule!r}, chunks={chunks!r}, virtual_stages={virtual_stages!r}): "
            "1f1b needs chunks >= devices, the interleaved schedules chunks a multiple of "
            "max(1, chunks // devices); give more chunks or schedule='auto'"
        )
    return out


def _schedules(schedule: str | Sequence[str], virtual_stages: int | str) -> list[str]:
    """The schedule names asked for, checked against `virtual_stages`."""
    if virtual_stages != AUTO and (
        isinstance(virtual_stages, bool)
        or not isinstance(virtual_stages, int)
        or virtual_stages < 1
    ):
        raise ValueError(f"virtual_stages must be 'auto' or an integer >= 1 ({virtual_stages!r})")
    asked = (
        list(SCHEDULES)
        if schedule == AUTO
        else [schedule]
        if isinstance(schedule, str)
        else list(schedule)
    )
    bad = [s for s in asked if s not in SCHEDULES]
    if bad or not asked:
        raise ValueError(
            f"schedule must be 'auto', one of {', '.join(SCHEDULES)} or a list of them "
            f"({schedule!r})"
        )
    if virtual_stages in (AUTO, 1):
        return asked
    names = [s for s in asked if s not in FLAT]
    if not names:
        raise ValueError(
            f"{' and '.join(asked)} run(s) one stage per device (virtual_stages="
            f"{virtual_stages}): use interleaved-1f1b or zero-bubble for more, or "
            "schedule='auto'"
        )
    return names


def chunk_options(
    graph: nx.DiGraph, num_devices: int, chunks: int | str | None, batch_size: int | None
) -> list[int]:
    """M to try: the one given (at most the batch's rows, as the runtime cuts it: one
    micro-batch per row), or for ``"auto"`` the multiples `AUTO_CHUNKS` of the device count
    that fit the batch, and the profile's own M (``None``: ``"auto"`` when the graph knows
    its batch and micro-batch size, else the profile's M)."""
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an integer >= 1 ({batch_size!r})")
    batch = batch_size if batch_size is not None else graph.graph.get("batch_size")
    known = batch is not None and graph.graph.get("micro_batch_size") is not None
    if chunks is None:
        chunks = AUTO if known else int(graph.graph.get("chunks", 1))
    if chunks == AUTO:
        if not known:
            raise ValueError(
                "chunks='auto' needs the batch size and the profile's micro-batch size "
                "(graph.graph['batch_size'], ['micro_batch_size']): pass batch_size= to a "
                "profiled graph, or chunks=M"
            )
        own = int(graph.graph.get("chunks", 1))
        found = {num_devices * f for f in AUTO_CHUNKS} | {own}
        return sorted({min(m, int(batch)) for m in found})
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be 'auto' or an integer >= 1 ({chunks!r})")
    return [min(chunks, int(batch)) if batch is not None else chunks]  # as `scatter` cuts


def _device_counts(k: int) -> range:
    """Devices a one-stage-per-device candidate may use: the first k, k - 1, ... down to
    half of them. A split on all k has the least bottleneck, but with few micro-batches and
    an indivisible heavy node a shorter pipeline can have the shorter step (its bubble is
    ``K - 1`` stages long): the split on all devices would not show it."""
    return range(k, (k + 1) // 2 - 1, -1) if k > 1 else range(1, 0, -1)


def _virtual(name: str, asked: int | str, k: int, nodes: int) -> tuple[int, ...]:
    if name in FLAT:
        return (1,)
    wanted = AUTO_VIRTUAL if asked == AUTO else (int(asked),)
    return tuple(v for v in wanted if k * v <= nodes or v == 1)


def _runs(name: str, k: int, m: int, v: int) -> bool:
    try:
        check_schedule(name, k, m, v)
    except ValueError:
        return False
    return True


def check_bwd(graph: nx.DiGraph) -> None:
    for node, data in graph.nodes(data=True):
        value = data.get("bwd_time", 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"node {node!r}: bwd_time must be a number (got {value!r})")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"node {node!r}: bwd_time must be finite and >= 0 (got {value})")


def is_training_graph(graph: nx.DiGraph) -> bool:
    """Whether `solve` makes a training plan of ``graph`` by default: a training profile
    (``graph.graph["training"]``) whose nodes carry ``bwd_time``.

    [Note: training by default]
    A profile of a model in training mode without backward costs (the profile before it
    measured ``bwd_time``) gets an inference plan, as it always did: a step time with every
    backward 0 would be no guide, and callers that run the plan with GPipe and one stage
    per device (ModelSplitter today) keep working. ``solve(training=True)`` plans such a
    graph for training all the same, and notes that its backward is taken as 0.
    """
    if not graph.graph.get("training", False):
        return False
    return any("bwd_time" in data for _, data in graph.nodes(data=True))


def inference_chunks(
    chunks: int | str | None,
    schedule: str | Sequence[str],
    virtual: int | str,
    checkpoint: bool | str,
    batch: Any,
) -> int:
    """An inference plan's M (default 1); ValueError for an option of training plans."""
    given = {"schedule": schedule, "virtual_stages": virtual, "checkpoint": checkpoint}
    odd = [f"{k}={v!r}" for k, v in given.items() if v != AUTO]
    odd += [f"batch_size={batch!r}"] if batch is not None else []
    odd += [f"chunks={chunks!r}"] if isinstance(chunks, str) else []
    if odd:
        raise ValueError(
            f"{', '.join(odd)} applies to training plans: pass training=True (or profile "
            "with training=True), or leave it out"
        )
    if chunks is None:
        return 1
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be an integer >= 1 ({chunks!r})")
    return chunks


def training_choice(graph: nx.DiGraph, schedule: str | None, checkpoint: bool) -> dict[str, Any]:
    """`solve`'s training options for a plan ModelSplitter runs.

    [Note: the splitter's training plan]
    A training profile gets a training plan for what the runtime will run: the splitter's
    ``schedule`` (with any virtual stages), else GPipe or 1F1B with one stage per device
    (the forward-then-``loss.backward()`` path, fault injection and recovery name one
    stage per device), recomputation only when the splitter checkpoints. Any other
    profile gets an inference plan.
    """
    if not is_training_graph(graph):
        return {"training": False}
    if schedule is None:
        return {
            "training": True,
            "schedule": ("gpipe", "1f1b"),
            "virtual_stages": 1,
            "checkpoint": checkpoint,
        }
    return {"training": True, "schedule": schedule, "checkpoint": checkpoint}
