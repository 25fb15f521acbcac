"""Training plans: the split, schedule, micro-batch count, virtual stages and recomputation
that minimise the simulated step time under each device's memory (docs/planner.md).

[Note: training solve]
A candidate is a `Choice` (schedule, M micro-batches, V virtual stages, recomputation, the
devices it uses: `partitioner.planner.candidates`). For each, a derived CostGraph turns the
step into the throughput objective the ILP already solves: a node's ``time`` becomes its
forward and backward per micro-batch (and its forward again when recomputed), its
``act_bytes`` the in-flight multiple the schedule keeps alive (the most micro-batches any
stage holds: exact for GPipe, conservative for the others, whose later stages hold fewer),
and K devices become K * V stages (stage s on device s % K, each with 1/V of the device's
memory). `solve` partitions it; the assignment is then scored on the real graph by
`stepcost.step_figures` (evaluate's forward figures, simulate's step time and exact
per-device peak), a candidate whose peak exceeds a device's memory is rejected, and the
fastest that fits wins. Identical derived problems are solved once: without memory limits
the partition depends only on V, recomputation and the devices used (scaling all costs by
the micro-batch rows scales the objective), so a few solves serve every schedule and M.
The time limit is shared: each derived problem gets what is left over the problems left;
the best candidate's problem then gets what remains, and `polish` moves single nodes on
the simulated step itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx

from partitioner.errors import InfeasiblePlanError
from partitioner.planner.candidates import AUTO, check_bwd, choices
from partitioner.planner.cost import Bandwidth, DeviceSpec, bandwidth_between, fmt_bytes
from partitioner.planner.heuristics import fill_stages
from partitioner.planner.plan import Plan, make_plan
from partitioner.planner.polish import polish_best, seeded
from partitioner.planner.stepcost import in_flight, rescaled, stage_bandwidth
from partitioner.planner.trainplan import Choice, Scored, finish, first_devices, rank, score

__all__ = [
    "AUTO",
    "Choice",
    "Run",
    "SubSolve",
    "solve_training",
    "train_plan",
]

log = logging.getLogger(__name__)

#: seconds left below which the best candidate's split is not solved again (`_improve`)
IMPROVE_MIN = 0.5
#: seconds kept for scoring and building the plan after the last derived solve
FINISH = 0.1

#: ``(graph, devices, bandwidth, time_limit) -> Plan``: the throughput solve
SubSolve = Callable[[nx.DiGraph, Sequence[DeviceSpec], Bandwidth, float], Plan]


@dataclass
class _Problem:
    """A derived throughput problem ([Note: training solve]) and what its solve gave."""

    graph: nx.DiGraph
    specs: list[DeviceSpec]
    bandwidth: Bandwidth
    virtual_stages: int
    estimate: float
    in_flight: int  # the activations' multiple in its act_bytes
    plan: Plan | None = None
    error: str = ""

    def why(self, error: InfeasiblePlanError) -> str:
        """Why no split fits, in the candidate's terms."""
        need = sum(
            int(d["param_bytes"]) + int(d["act_bytes"]) for _, d in self.graph.nodes(data=True)
        )
        limits = [s.memory for s in self.specs]
        offer = sum(m or 0 for m in limits)
        if None not in limits and need > offer:
            return (
                f"its weights and {self.in_flight} micro-batch(es) of activations in flight "
                f"need {fmt_bytes(need)} in all, over the {fmt_bytes(offer)} the devices offer"
            )
        text = str(error)
        return f"no split fits ({text if len(text) <= 160 else text[:157] + '...'})"


@dataclass(frozen=True)
class Run:
    """How `solve` was called: itself (for the derived problems, with `sub` keywords), the
    objective, the time limit, the requested gap, its start and the Plan's labels."""

    solve: Callable[..., Plan]
    sub: dict[str, Any]
    objective: str
    time_limit: float
    gap: float
    t0: float
    plan_kw: dict[str, Any]


def train_plan(
    graph: nx.DiGraph,
    specs: Sequence[DeviceSpec],
    bandwidth: Bandwidth,
    run: Run,
    options: dict[str, Any],
) -> Plan:
    """`solve_training` as `solve` calls it (the throughput objective only)."""
    if run.objective != "throughput":
        raise ValueError(
            f"a training plan minimises the step time: objective={run.objective!r} is for "
            "inference plans (pass training=False, or leave objective out)"
        )

    def sub_solve(g: nx.DiGraph, sub: Sequence[DeviceSpec], bw: Bandwidth, t: float) -> Plan:
        return run.solve(g, sub, bandwidth=bw, time_limit=t, **run.sub)

    return solve_training(
        graph,
        specs,
        bandwidth,
        sub_solve,
        time_limit=run.time_limit,
        gap=run.gap,
        t0=run.t0,
        plan_kw=run.plan_kw,
        **options,
    )


def solve_training(
    graph: nx.DiGraph,
    specs: Sequence[DeviceSpec],
    bandwidth: Bandwidth,
    sub_solve: SubSolve,
    *,
    schedule: str | Sequence[str] = AUTO,
    chunks: int | str | None = None,
    virtual_stages: int | str = AUTO,
    checkpoint: bool | str = AUTO,
    batch_size: int | None = None,
    time_limit: float = 30.0,
    gap: float = 0.01,
    t0: float | None = None,
    plan_kw: dict[str, Any] | None = None,
) -> Plan:
    """The training plan of least simulated step time that fits every device's memory.

    ``sub_solve`` is the throughput `solve` ([Note: training solve]). Raises ValueError for
    options that do not go together and InfeasiblePlanError when no candidate fits.
    """
    t0 = time.perf_counter() if t0 is None else t0
    check_bwd(graph)
    limited = any(s.memory is not None for s in specs)
    cands = choices(
        graph, len(specs), schedule, chunks, virtual_stages, checkpoint, batch_size, limited
    )
    graphs = {m: rescaled(graph, m, batch_size) for m in sorted({c.chunks for c in cands})}
    keyed = _problems(cands, graphs, specs, bandwidth, limited)
    deadline = t0 + time_limit
    with _quiet_subsolves():
        _run(list({id(p): p for _, p in keyed}.values()), sub_solve, deadline)
        scored = _score(keyed, graphs, specs, bandwidth)
        scored = _improve(keyed, scored, graphs, specs, bandwidth, sub_solve, deadline)
        end = deadline - FINISH
        seeds_end = time.perf_counter() + max(0.0, end - time.perf_counter()) / 2
        scored = polish_best(seeded(scored, specs, bandwidth, seeds_end), end)
    failed = {c: p.error for c, p in keyed if p.plan is None}
    return finish(graph, graphs, specs, scored, failed, gap, t0, plan_kw or {})


def _problems(
    cands: Sequence[Choice],
    graphs: dict[int, nx.DiGraph],
    specs: Sequence[DeviceSpec],
    bandwidth: Bandwidth,
    limited: bool,
) -> list[tuple[Choice, _Problem]]:
    """Each candidate with its derived problem, one problem per `_key`."""
    problems: dict[tuple[Any, ...], _Problem] = {}
    keyed = []
    for c in cands:
        mine = list(specs[: c.devices or len(specs)])
        key = (c.devices, *_key(c, limited, len(mine)))
        if key not in problems:
            problems[key] = _problem(
                graphs[c.chunks], mine, first_devices(bandwidth, len(mine)), c, limited
            )
        problems[key].estimate = min(problems[key].estimate, _estimate(graphs[c.chunks], c, mine))
        keyed.append((c, problems[key]))
    return keyed


def _score(
    keyed: Sequence[tuple[Choice, _Problem]],
    graphs: dict[int, nx.DiGraph],
    specs: Sequence[DeviceSpec],
    bandwidth: Bandwidth,
) -> list[Scored]:
    out = []
    for c, p in keyed:
        found = None if p.plan is None else score(graphs[c.chunks], c, p.plan, specs, bandwidth)
        if found is not None:
            out.append(found)
    return out


def _improve(
    keyed: Sequence[tuple[Choice, _Problem]],
    scored: list[Scored],
    graphs: dict[int, nx.DiGraph],
    specs: Sequence[DeviceSpec],
    bandwidth: Bandwidth,
    sub_solve: SubSolve,
    deadline: float,
) -> list[Scored]:
    """Give the time left to the best candidate's derived problem, when its split is not
    proven: a first pass shares the limit among all problems, so each got a little."""
    fitting = [s for s in scored if s.fits]
    left = deadline - time.perf_counter() - FINISH
    if not fitting or left < IMPROVE_MIN:
        return scored
    best = min(fitting, key=rank)
    problem = next(p for c, p in keyed if c == best.choice)
    if problem.plan is None or problem.plan.status == "optimal":
        return scored
    try:
        again = sub_solve(problem.graph, problem.specs, problem.bandwidth, left)
    except InfeasiblePlanError:
        return scored
    if again.bottleneck > problem.plan.bottleneck or again.num_stages != problem.plan.num_stages:
        return scored
    problem.plan = again
    return _score(keyed, graphs, specs, bandwidth)


@contextlib.contextmanager
def _quiet_subsolves() -> Iterator[None]:
    """Drop the derived solves' warning that their ILP got no time: with the limit shared
    among candidates that is expected, and the plan's status tells it."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("solve: the ILP")

    solver_log = logging.getLogger("partitioner.planner.solver")
    solver_log.addFilter(keep)
    try:
        yield
    finally:
        solver_log.removeFilter(keep)


def _key(c: Choice, limited: bool, k: int) -> tuple[Any, ...]:
    """Choices with one key share a derived problem ([Note: training solve])."""
    if not limited:
        return (c.virtual_stages, c.checkpoint)
    mult = max(in_flight(c.schedule, k, c.chunks, c.virtual_stages))
    return (c.virtual_stages, c.checkpoint, c.chunks, mult)


def _problem(
    graph: nx.DiGraph,
    specs: Sequence[DeviceSpec],
    bandwidth: Bandwidth,
    c: Choice,
    limited: bool,
) -> _Problem:
    """The derived throughput problem of ``c`` on ``graph`` (at c's micro-batch size)."""
    k, v = len(specs), c.virtual_stages
    mult = max(in_flight(c.schedule, k, c.chunks, v)) if limited else 1
    derived = graph.copy()
    for _, data in derived.nodes(data=True):
        fwd = float(data["time"])
        data["time"] = fwd + float(data.get("bwd_time", 0.0)) + (fwd if c.checkpoint else 0.0)
        data["act_bytes"] = int(data["act_bytes"]) * (1 if c.checkpoint else mult)
    # a recomputed stage keeps its inputs per micro-batch in flight: reserve one tensor each
    widest = max((int(d["out_bytes"]) for _, d in graph.nodes(data=True)), default=0)
    reserve = mult * widest if c.checkpoint else 0
    sub = [
        DeviceSpec(
            specs[s % k].name if v == 1 else f"{specs[s % k].name}#{s}",
            None if (mem := specs[s % k].memory) is None else max(0, mem // v - reserve),
            specs[s % k].speed,
        )
        for s in range(k * v)
    ]
    fastest = (
        max(bandwidth_between(bandwidth, a, b) for a in range(k) for b in range(k) if a != b)
        if k > 1
        else 1.0
    )
    bw = stage_bandwidth(bandwidth, k, v, same=fastest)
    return _Problem(derived, sub, bw, v, math.inf, 1 if c.checkpoint else mult)


def _filled(p: _Problem, plan: Plan) -> Plan | None:
    """``plan`` with its empty stages filled (`fill_stages`): an interleaved schedule runs
    all K * V stages. None, with the reason in ``p.error``, when the graph has fewer nodes."""
    filled = fill_stages(p.graph, plan.assignment, len(p.specs))
    if filled is None:
        p.error = f"the split left {len(p.specs) - plan.num_stages} of its stages empty"
        return None
    again = make_plan(
        p.graph,
        filled,
        p.specs,
        bandwidth=p.bandwidth,
        lower_bound=plan.lower_bound,
        status=plan.status,
        solver=plan.solver,
        solve_time=plan.solve_time,
        meta=plan.meta,
    )
    if again.bottleneck > plan.bottleneck * (1 + 1e-12) and plan.status == "optimal":
        again.status = "feasible"  # a cut stage receives more: not the proven bottleneck
    return again


def _estimate(graph: nx.DiGraph, c: Choice, specs: Sequence[DeviceSpec]) -> float:
    """A step time for ordering the derived problems: even stages, the schedule's bubble."""
    work = sum(float(d["time"]) + float(d.get("bwd_time", 0.0)) for _, d in graph.nodes(data=True))
    k = len(specs)
    per = work * (2 if c.checkpoint else 1) / sum(s.speed for s in specs)
    bubble = (k - 1) / c.virtual_stages / (3 if c.schedule == "zero-bubble" else 1)
    return (c.chunks + bubble) * per


def _run(problems: list[_Problem], sub_solve: SubSolve, deadline: float) -> None:
    """Solve each derived problem, most promising first, sharing the time left.

    A solve's first plan always runs, whatever its limit (0.5 s on a 1000-node graph), so
    a problem is not started once the time left is below the shortest solve that gave a
    plan: the limit holds with dozens of candidates.
    """
    problems = sorted(problems, key=lambda p: p.estimate)
    shortest = 0.0
    for i, p in enumerate(problems):
        left = deadline - time.perf_counter()
        if i and left <= shortest:
            p.error = "not tried: the time limit was spent on the candidates before it"
            continue
        start = time.perf_counter()
        try:
            p.plan = sub_solve(
                p.graph, p.specs, p.bandwidth, max(left / (len(problems) - i), 0.01)
            )
        except InfeasiblePlanError as e:
            p.error = p.why(e)
            continue
        took = time.perf_counter() - start
        shortest = took if shortest == 0 else min(shortest, took)
        if p.virtual_stages > 1 and p.plan.num_stages < len(p.specs):
            p.plan = _filled(p, p.plan)
    log.debug("training solve: %d derived problems", len(problems))
