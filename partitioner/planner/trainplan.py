"""Scoring training candidates on the real graph, and the training Plan with its notes.

Every figure of a training plan comes from `stepcost.step_figures` on its assignment:
the stages' forward figures from `evaluate`, ``step_time`` (plus the tied weights'
exchange) and ``peak_memory`` from `simulate` ([Note: training solve] in
`partitioner.planner.training`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx

from partitioner.errors import InfeasiblePlanError
from partitioner.planner.cost import Bandwidth, DeviceSpec, fmt_bytes
from partitioner.planner.plan import Plan, make_plan
from partitioner.planner.schedules import SCHEDULES, check_schedule
from partitioner.planner.stepcost import (
    StepFigures,
    in_flight,
    stage_bandwidth,
    stage_specs,
    step_figures,
    step_lower_bound,
)

__all__ = [
    "FLAT",
    "Choice",
    "Scored",
    "describe",
    "finish",
    "first_devices",
    "rank",
    "rescore",
    "score",
    "scored_split",
]

#: schedules that run one stage per device
FLAT = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Choice:
    """One training candidate: `schedule` with `chunks` micro-batches, `virtual_stages`
    stages per device, each recomputing its forward in backward when `checkpoint`, on the
    first `devices` of the devices offered (0: all of them)."""

    schedule: str
    chunks: int
    virtual_stages: int = 1
    checkpoint: bool = False
    devices: int = 0


@dataclass(frozen=True)
class Scored:
    """A candidate's split scored on the real graph: `over` lists (device index, peak
    bytes, limit) for each device whose memory it exceeds."""

    choice: Choice
    sub: Plan  # the derived problem's plan
    assignment: dict[str, int]
    specs: list[DeviceSpec]  # the devices it uses, in order
    bandwidth: Bandwidth  # between those devices
    figures: StepFigures
    over: list[tuple[int, int, int]]
    graph: nx.DiGraph  # the real graph at the candidate's micro-batch size

    @property
    def fits(self) -> bool:
        return not self.over

    @property
    def step_time(self) -> float:
        return self.figures.step_time


def describe(c: Choice) -> str:
    """``"1f1b with 8 micro-batches"``, with the virtual stages and recomputation if any."""
    text = f"{c.schedule} with {c.chunks} micro-batches"
    if c.virtual_stages > 1:
        text += f", {c.virtual_stages} stages per device"
    return text + (", recomputing each stage's forward" if c.checkpoint else "")


def score(
    graph: nx.DiGraph,
    c: Choice,
    sub: Plan,
    specs: Sequence[DeviceSpec],
    bandwidth: Bandwidth,
) -> Scored | None:
    """``c`` on the split `sub` found (``graph`` at c's micro-batch size), or None when the
    schedule cannot run on the devices the split uses."""
    v = c.virtual_stages
    if v == 1:  # the split may use fewer devices than offered: those, in order
        at = {s.name: i for i, s in enumerate(specs)}
        used = [at[d.name] for d in sub.device_specs]
    else:
        used = list(range(len(specs)))
    mine = [specs[i] for i in used]
    bw: Bandwidth = bandwidth
    if not isinstance(bandwidth, int | float):
        bw = [[float(bandwidth[a][b]) for b in used] for a in used]
    return scored_split(graph, c, sub, dict(sub.assignment), mine, bw)


def rescore(s: Scored, assignment: Mapping[str, int]) -> Scored | None:
    """``s``'s candidate on another split of the same stages."""
    return scored_split(s.graph, s.choice, s.sub, dict(assignment), s.specs, s.bandwidth)


def first_devices(bandwidth: Bandwidth, k: int) -> Bandwidth:
    """The bandwidth among the first k devices."""
    if isinstance(bandwidth, int | float):
        return bandwidth
    return [[float(x) for x in row[:k]] for row in bandwidth[:k]]


def scored_split(
    graph: nx.DiGraph,
    c: Choice,
    sub: Plan,
    assignment: dict[str, int],
    specs: list[DeviceSpec],
    bandwidth: Bandwidth,
) -> Scored | None:
    """``c`` on ``assignment`` (stages 0..K*V-1 on ``specs``), or None when the schedule
    cannot run on those devices; ``sub`` is the derived plan it is credited to."""
    try:
        check_schedule(c.schedule, len(specs), c.chunks, c.virtual_stages)
    except ValueError:
        return None
    fig = step_figures(
        graph, assignment, specs, bandwidth, c.schedule, c.chunks, c.virtual_stages, c.checkpoint
    )
    over = [
        (d, peak, spec.memory)
        for d, (peak, spec) in enumerate(zip(fig.peak_memory, specs, strict=True))
        if spec.memory is not None and peak > spec.memory
    ]
    return Scored(c, sub, assignment, specs, bandwidth, fig, over, graph)


def rank(s: Scored) -> tuple[Any, ...]:
    """Sort key: the step time, then the peak memory, then the simpler candidate."""
    c = s.choice
    order = (SCHEDULES.index(c.schedule), c.virtual_stages, c.checkpoint, c.chunks)
    return (s.step_time, max(s.figures.peak_memory), *order)


def finish(
    graph: nx.DiGraph,
    graphs: Mapping[int, nx.DiGraph],
    specs: Sequence[DeviceSpec],
    scored: Sequence[Scored],
    failed: Mapping[Choice, str],
    gap: float,
    t0: float,
    plan_kw: Mapping[str, Any],
) -> Plan:
    """The Plan of the fastest candidate that fits; InfeasiblePlanError when none does."""
    fitting = [s for s in scored if s.fits]
    if not fitting:
        why = "; ".join(_others(None, scored, failed)) or "no candidate could be scored"
        if not scored and failed and all("empty" in text for text in failed.values()):
            raise InfeasiblePlanError(
                f"no training plan: {why}; the graph has too few nodes for that many stages: "
                "use fewer devices or virtual stages (virtual_stages=1)"
            )
        raise InfeasiblePlanError(
            f"no training plan fits the devices' memory: {why}; raise the memory limits, add "
            "devices, allow recomputation (solve(checkpoint=True); "
            'ModelSplitter(checkpoint="always")) or use more micro-batches'
        )
    best = min(fitting, key=rank)
    bound = min(step_lower_bound(g, specs, m) for m, g in graphs.items())
    notes = _notes(best, scored, failed, graph, graphs[best.choice.chunks])
    return _plan(graphs[best.choice.chunks], best, bound, gap, t0, plan_kw, notes, len(scored))


def _plan(
    graph: nx.DiGraph,
    best: Scored,
    bound: float,
    gap: float,
    t0: float,
    plan_kw: Mapping[str, Any],
    notes: list[str],
    scored: int,
) -> Plan:
    c, k = best.choice, len(best.specs)
    v = c.virtual_stages
    base = make_plan(
        graph,
        best.assignment,
        stage_specs(best.specs, v),
        bandwidth=stage_bandwidth(best.bandwidth, k, v),
        lower_bound=0.0,
        status="feasible",
        solver=best.sub.solver,
        chunks=c.chunks,
        **plan_kw,
    )
    step = best.step_time
    bound = min(bound, step)
    got = 0.0 if step <= 0 else (step - bound) / step
    status = "optimal" if got <= gap else "feasible"
    if status == "feasible" and best.sub.status == "heuristic":
        status = "heuristic"
    meta = dict(best.sub.meta)
    meta.update(
        split_bottleneck=best.sub.bottleneck,  # of the derived forward + backward problem
        split_status=best.sub.status,
        candidates=scored,
    )
    return replace(
        base,
        device_specs=list(best.specs),
        stages=[replace(st, device=best.specs[s % k].name) for s, st in enumerate(base.stages)],
        bandwidth=best.bandwidth,
        lower_bound=bound,
        gap=got,
        status=status,
        solve_time=time.perf_counter() - t0,
        meta=meta,
        schedule=c.schedule,
        virtual_stages=v,
        checkpoint=c.checkpoint,
        step_time=step,
        peak_memory=best.figures.peak_memory,
        notes=notes,
    )


def _secs(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 or seconds == 0 else f"{seconds * 1e3:.3g} ms"


def _notes(
    best: Scored,
    scored: Sequence[Scored],
    failed: Mapping[Choice, str],
    graph: nx.DiGraph,
    at: nx.DiGraph,
) -> list[str]:
    """Why this candidate: its step and memory, then each other schedule's best or why it
    did not fit, and the approximations the figures rest on."""
    c = best.choice
    fits = sum(s.fits for s in scored)
    lines = [
        f"chose {describe(c)}: step {_secs(best.step_time)}, the fastest of {fits} "
        f"candidate(s) that fit ({len(scored) + len(failed)} tried)",
        _memory_line(best),
    ]
    lines += _others(best, scored, failed)
    rows, profiled = at.graph.get("micro_batch_size"), graph.graph.get("micro_batch_size")
    if rows is not None and profiled is not None and rows != profiled:
        lines.append(
            f"costs rescaled from the profile's micro-batch of {profiled} rows to {rows} rows "
            "(linear in rows: an approximation; profile at this micro-batch size to remove it)"
        )
    if all(float(d.get("bwd_time", 0.0)) == 0 for _, d in graph.nodes(data=True)):
        lines.append("the graph has no bwd_time (profile with training=True): backward taken as 0")
    if best.figures.tied > 0:
        lines.append(
            f"tied weights read on several devices add {_secs(best.figures.tied)} per step "
            "to exchange their gradients"
        )
    return lines


def _memory_line(s: Scored) -> str:
    c, peaks = s.choice, s.figures.peak_memory
    d = max(range(len(peaks)), key=lambda j: (peaks[j], -j))
    limit = s.specs[d].memory
    of = f" (of its {fmt_bytes(limit)})" if limit is not None else ""
    most = max(in_flight(c.schedule, len(s.specs), c.chunks, c.virtual_stages))
    return (
        f"{c.schedule} keeps at most {most} micro-batch(es) in flight per stage: peak "
        f"{fmt_bytes(peaks[d])} on {s.specs[d].name}{of}"
    )


def _others(
    best: Scored | None, scored: Sequence[Scored], failed: Mapping[Choice, str]
) -> list[str]:
    """One line per schedule other than the best's: its fastest fitting candidate, or its
    smallest overshoot of a device's memory, or why its split failed."""
    tried = [
        n
        for n in SCHEDULES
        if any(c.schedule == n for c in [*failed, *(s.choice for s in scored)])
    ]
    lines = []
    for name in tried:
        if best is not None and name == best.choice.schedule:
            continue
        mine = [s for s in scored if s.choice.schedule == name]
        ok = [s for s in mine if s.fits]
        if ok:
            top = min(ok, key=rank)
            lines.append(f"{name}: step {_secs(top.step_time)} at best ({describe(top.choice)})")
            continue
        over = _over_on(best, name) if best is not None else None
        if over is None and mine:
            over = min(mine, key=lambda s: max(p / lim for _, p, lim in s.over))
        if over is not None:
            d, peak, limit = max(over.over, key=lambda o: o[1] / o[2])
            lines.append(
                f"{name} needs {fmt_bytes(peak)} on {over.specs[d].name} with "
                f"{over.choice.chunks} micro-batches, over its {fmt_bytes(limit)}"
            )
            continue
        c, reason = next((c, e) for c, e in failed.items() if c.schedule == name)
        lines.append(f"{describe(c)}: {reason}")
    return lines


def _over_on(best: Scored, name: str) -> Scored | None:
    """``name`` with best's micro-batches scored on best's split, when it runs there and
    overshoots a device's memory: what it would need where best fits."""
    v = 1 if name in FLAT else best.choice.virtual_stages
    if v != best.choice.virtual_stages:
        return None
    c = Choice(name, best.choice.chunks, v, best.choice.checkpoint, best.choice.devices)
    found = scored_split(best.graph, c, best.sub, best.assignment, best.specs, best.bandwidth)
    return found if found is not None and not found.fits else None
