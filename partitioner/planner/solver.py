"""`solve`: the planner's entry point, from a CostGraph and devices to a Plan.

Phases (each logged at debug level):

1. check the input (ValueError) and memory (InfeasiblePlanError, before any ILP);
2. an incumbent: the best contiguous split of a topological order of a coarsened
   graph by dynamic programming, a greedy split of the fine order, and the four
   baselines (`partitioner.planner.baselines`), the best two polished by local moves of
   single nodes; a plan is therefore never worse than a baseline that fits;
3. lower bounds valid for the fine graph (`partitioner.planner.bounds`); if the
   incumbent is within ``gap`` of them, stop: the plan is proven;
4. the ILP (`partitioner.planner.ilp`) warm-started from the incumbent, with stages
   fixed outside the windows that any plan as good as the incumbent respects:
   on the exactly reduced graph (`coarsen.reduce_exact`) when it is small, else
   on the coarsened graph (`coarsen.coarsen`);
5. after a coarse ILP, and while time is left, the exactly reduced ILP from the
   best plan: its bound is valid for the fine graph (a coarse one is not).

Time: one budget, ``deadline = start + time_limit``, for all of it. Each phase after
the first plan takes a share of what is left (the receive floors stop early, a model
whose building would not fit is not built, HiGHS gets what is left once its model is
built, minus a margin for its overshoot) and `levels.FINISH_RESERVE` stays for the end,
so `solve` returns within ``1.1 * time_limit + 0.3`` seconds. A KeyboardInterrupt stops
HiGHS ([Note: stopping HiGHS] in `partitioner.planner.ilp`) and propagates.

Status: ``"optimal"`` when the returned bottleneck is within ``gap`` of a bound
valid for the *original* graph; ``"feasible"`` otherwise (time limit, or a
coarse ILP whose optimum proves nothing about the fine graph); ``"heuristic"``
when no ILP solution came back at all (logged as a warning). Plans are
deterministic for identical input unless the ILP stops on its time limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import networkx as nx

from partitioner.errors import InfeasiblePlanError
from partitioner.planner import coarsen as _coarsen
from partitioner.planner.bounds import fine_lower_bound
from partitioner.planner.candidates import inference_chunks, is_training_graph
from partitioner.planner.cost import (
    DEFAULT_BANDWIDTH,
    Bandwidth,
    DevicesLike,
    DeviceSpec,
    check_bandwidth,
    normalize_devices,
    validate_graph,
)
from partitioner.planner.heuristics import Indexed, contiguous_split, index_graph
from partitioner.planner.ilp import available_solvers, solve_ilp
from partitioner.planner.levels import (
    DP_LIMIT,
    FINISH_RESERVE,
    Level,
    best_of,
    check_memory,
    floors_until,
    incumbent,
    level_of,
    memory_message,
    score,
)
from partitioner.planner.plan import Plan, make_plan
from partitioner.planner.training import Run, train_plan

__all__ = ["check_memory", "solve"]

log = logging.getLogger(__name__)

#: the exactly reduced graph goes to the ILP as it is when groups x stages stays under this
FINE_LIMIT = 1500
#: the proving fine ILP is tried when its free binaries (inside the stage windows) stay under this
PROVE_LIMIT = 20000
#: share of the remaining time the coarse ILP may use (the rest goes to the proof)
ILP_SHARE = 0.5
#: shares of the remaining time the receive floors may use before the first ILP and after
#: it: the first is generous, as floors cut short lose the comm bound (`floors_until`)
FLOOR_SHARES = (0.85, 0.3)
#: seconds of HiGHS below which the proving fine ILP is not started
PROVE_MIN = 0.5


def solve(
    graph: nx.DiGraph,
    devices: DevicesLike,
    *,
    bandwidth: Bandwidth = DEFAULT_BANDWIDTH,
    objective: str = "throughput",
    imbalance: float = 0.05,
    solver: str | None = None,
    time_limit: float = 30.0,
    gap: float = 0.01,
    coarsen: bool = True,
    chunks: int | str | None = None,
    signature: Sequence[Any] = (),
    model: str = "",
    training: bool | None = None,
    schedule: str | Sequence[str] = "auto",
    virtual_stages: int | str = "auto",
    checkpoint: bool | str = "auto",
    batch_size: int | None = None,
) -> Plan:
    """Partition ``graph`` into stages on ``devices`` (stage k on ``devices[k]``).

    ``training`` (default: whether ``graph`` is a training profile with backward costs,
    `is_training_graph`) makes a training plan: the split,
    ``schedule`` (``"auto"`` or one of gpipe, 1f1b, interleaved-1f1b, zero-bubble),
    ``chunks`` (M; ``"auto"``, the default, tries a few that fit ``batch_size``),
    ``virtual_stages`` and ``checkpoint`` (recomputation) of least simulated step time
    under each device's memory (`partitioner.planner.training`, docs/planner.md). Without
    it the plan is for inference, ``chunks`` is an integer (default 1) and the schedule
    options are refused.

    ``objective="throughput"`` minimises the bottleneck stage cost, ties broken by
    fewer bytes; ``"balanced-cut"`` minimises bytes with every stage's compute
    within ``imbalance`` of the even share. ``solver``: ``"highs"``, ``"cbc"`` or
    None (HiGHS if installed, else CBC). ``time_limit``: seconds for the whole solve,
    which returns within ``1.1 * time_limit + 0.3`` (docs/planner.md); ``gap`` is the
    relative gap under which a plan counts as proven. More devices than useful give a
    plan with fewer stages. Raises ValueError for bad input and InfeasiblePlanError
    when the memory limits cannot be met; a KeyboardInterrupt (Ctrl-C) during the ILP
    stops HiGHS and reaches the caller within about half a second.
    """
    t0 = time.perf_counter()
    validate_graph(graph)
    specs = normalize_devices(devices)
    check_bandwidth(bandwidth, len(specs))
    name = _pick_solver(solver)
    _check_args(objective, imbalance, time_limit, gap)
    train = is_training_graph(graph) if training is None else training
    label = model or str(graph.graph.get("model", ""))
    if train:  # [Note: training solve]: the throughput solve below on derived graphs
        options = dict(schedule=schedule, chunks=chunks, virtual_stages=virtual_stages)
        options.update(checkpoint=checkpoint, batch_size=batch_size)
        sub = dict(solver=name, gap=gap, coarsen=coarsen, training=False)
        run = Run(
            solve, sub, objective, time_limit, gap, t0, dict(signature=signature, model=label)
        )
        return train_plan(graph, specs, bandwidth, run, options)
    chunks = inference_chunks(chunks, schedule, virtual_stages, checkpoint, batch_size)
    check_memory(graph, specs)
    g = index_graph(graph)
    kw: dict[str, Any] = dict(
        bandwidth=bandwidth,
        objective=objective,
        chunks=chunks,
        signature=signature,
        model=label,
    )
    if objective == "balanced-cut":
        from partitioner.planner.balanced import solve_balanced

        return solve_balanced(
            graph, g, specs, name, imbalance, time_limit, gap, coarsen, t0, kw, FINE_LIMIT
        )
    return _throughput(graph, g, specs, bandwidth, name, time_limit, gap, coarsen, t0, kw)


def _throughput(
    graph: nx.DiGraph,
    g: Indexed,
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
    solver: str,
    time_limit: float,
    gap: float,
    coarsen: bool,
    t0: float,
    kw: dict[str, Any],
) -> Plan:
    deadline = t0 + time_limit  # every phase below ends by it (see docs/planner.md)
    exact, level, small, best = _levels(graph, g, specs, bw, coarsen, t0, deadline)
    meta: dict[str, Any] = {"nodes": g.n, "coarse_nodes": level.n, "ilp": "none"}
    upper = score(g, best, specs, bw)[0] if best is not None else None
    floors = _floors(g, specs, upper, None, deadline, FLOOR_SHARES[0])
    bound = fine_lower_bound(graph, g, specs, bw, upper, floors)
    if best is not None and _proven(g, best, specs, bw, bound, gap):
        meta["ilp"] = "skipped: the incumbent is within the gap of the lower bound"
        return _finish(graph, g, best, specs, bound, "optimal", solver, t0, meta, kw)
    left = deadline - time.perf_counter()
    res = solve_ilp(  # floors only where the ILP proves: the coarse one searches
        level.with_floors(floors) if floors and small else level.inp,
        specs,
        bw,
        solver=solver,
        time_limit=_first_share(left, small),
        gap=gap,
        start=level.start(best) if best is not None else None,
        upper=upper,
    )
    meta["ilp"] = f"{'fine' if small else 'coarse'} {res.seconds:.2f}s"
    if res.infeasible and small and upper is None:
        raise InfeasiblePlanError(memory_message(graph, specs, "the ILP proved it"))
    if small:
        bound = max(bound, res.bound)
    if res.stage is None and best is None:
        raise InfeasiblePlanError(memory_message(graph, specs, "no assignment was found"))
    got = level.fine(res.stage) if res.stage is not None else None
    best = best_of(g, [s for s in (best, got) if s is not None], specs, bw, polish=not small)
    if upper is None or score(g, best, specs, bw)[0] < upper:
        upper = score(g, best, specs, bw)[0]
        floors = _floors(g, specs, upper, floors, deadline, FLOOR_SHARES[1])
        bound = max(bound, fine_lower_bound(graph, g, specs, bw, upper, floors))
    if not small and not _proven(g, best, specs, bw, bound, gap):
        bound, best = _prove(
            exact, g, specs, bw, solver, deadline, gap, upper, floors, bound, best, meta
        )
    if res.stage is None:
        why = "returned no solution" if res.built else "did not fit in the time left"
        log.warning("solve: the ILP %s; using the best heuristic plan", why)
        return _finish(graph, g, best, specs, bound, "heuristic", solver, t0, meta, kw)
    status = "optimal" if _proven(g, best, specs, bw, bound, gap) else "feasible"
    return _finish(graph, g, best, specs, bound, status, solver, t0, meta, kw)


def _first_share(left: float, small: bool) -> float:
    """Seconds for the first ILP: all that is left on the exact level, else ILP_SHARE of it
    while the rest can still run a proof."""
    if small or left * (1 - ILP_SHARE) < PROVE_MIN:
        return left - FINISH_RESERVE
    return left * ILP_SHARE


def _levels(
    graph: nx.DiGraph,
    g: Indexed,
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
    coarsen: bool,
    t0: float,
    deadline: float,
) -> tuple[Level, Level, bool, list[int] | None]:
    """The exact level, the level the first ILP works on, whether it is the exact one
    (``small``), and the heuristic incumbent (None when no heuristic fits memory). A finer
    level for the DP is coarsened only while under half of the time is gone: on a 4,232-node
    graph at 16 stages the levels took 1 s of a 2 s limit and the finer one 0.4 s more, for a
    level no smaller, and the solve ran 3 s (tests/test_solve_limits.py)."""
    limited = any(s.memory is not None for s in specs)
    exact = level_of(_coarsen.reduce_exact(graph, limited), g)
    small = exact.n * len(specs) <= FINE_LIMIT or not coarsen
    level = exact if small else level_of(_coarse(graph, specs, 0.25), g)
    dp = exact
    if len(specs) * dp.n**2 > DP_LIMIT and time.perf_counter() > t0 + 0.5 * (deadline - t0):
        dp = level
    if len(specs) * dp.n**2 > DP_LIMIT and coarsen:
        dp = level_of(_coarse(graph, specs, 0.1), g)
        if len(specs) * dp.n**2 > DP_LIMIT:
            dp = level
    best = incumbent(dp, g, specs, bw, graph)
    if level is not dp and len(specs) * level.n**2 <= DP_LIMIT:
        inp = level.inp  # its DP split is the ILP's fallback start
        level.dp = contiguous_split(inp.time, inp.mem, inp.tensors, specs, bw)
    return exact, level, small, best


def _floors(
    g: Indexed,
    specs: Sequence[DeviceSpec],
    upper: float | None,
    old: list[float] | None,
    deadline: float,
    share: float,
) -> list[float] | None:
    """Receive floors for ``upper`` in at most ``share`` of the time left (None without
    ``upper``), at least the ``old`` ones: floors for a larger upper stay valid."""
    if upper is None:
        return None
    now = time.perf_counter()
    floors = floors_until(g, specs, upper, now + share * (deadline - now))
    return floors if old is None else [max(a, b) for a, b in zip(floors, old, strict=True)]


def _prove(
    exact: Level,
    g: Indexed,
    specs: Sequence[DeviceSpec],
    bw: Bandwidth,
    solver: str,
    deadline: float,
    gap: float,
    upper: float,
    floors: Sequence[float] | None,
    bound: float,
    best: list[int],
    meta: dict[str, Any],
) -> tuple[float, list[int]]:
    """Run the exactly reduced ILP from the best plan: its bound holds for the fine graph.

    Stage windows and receive floors for ``upper`` keep it small; it is not built when
    it has more than PROVE_LIMIT free binaries or the time left would not give HiGHS
    PROVE_MIN seconds. (Asking instead for a plan under ``(1 - gap) * upper`` and
    proving infeasibility was slower with HiGHS: without an incumbent it prunes less.)
    """
    left = deadline - time.perf_counter() - FINISH_RESERVE
    if left < PROVE_MIN:
        return bound, best
    proof = solve_ilp(
        exact.with_floors(floors) if floors else exact.inp,
        specs,
        bw,
        solver=solver,
        time_limit=left,
        gap=gap,
        start=exact.start(best),
        upper=upper,
        max_binaries=PROVE_LIMIT,
        min_run=PROVE_MIN,
    )
    meta["ilp"] += f", fine {proof.seconds:.2f}s" if proof.built else ", fine not built"
    bound = max(bound, proof.bound)
    if proof.stage is not None:
        best = best_of(g, [best, exact.fine(proof.stage)], specs, bw)
    return bound, best


def _proven(
    g: Indexed, stage: list[int], specs: Sequence[DeviceSpec], bw: Bandwidth, lb: float, gap: float
) -> bool:
    top = score(g, stage, specs, bw)[0]
    return top <= 0 or (top - lb) / top <= gap


def _pick_solver(solver: str | None) -> str:
    have = available_solvers()
    if solver is None:
        if not have:
            raise RuntimeError("no MILP solver: install highspy (HiGHS) or pulp's CBC")
        return have[0]
    if solver not in ("highs", "cbc"):
        raise ValueError(f"solver must be 'highs', 'cbc' or None (got {solver!r})")
    if solver not in have:
        raise ValueError(f"solver {solver!r} is not available here (available: {have})")
    return solver


def _check_args(objective: str, imbalance: float, time_limit: float, gap: float) -> None:
    if objective not in ("throughput", "balanced-cut"):
        raise ValueError(f"objective must be 'throughput' or 'balanced-cut' (got {objective!r})")
    if not imbalance >= 0:
        raise ValueError(f"imbalance must be >= 0 (got {imbalance})")
    if not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds (got {time_limit})")
    if not 0 <= gap < 1:
        raise ValueError(f"gap must be in [0, 1) (got {gap})")


def _coarse(
    graph: nx.DiGraph, specs: Sequence[DeviceSpec], fraction: float
) -> _coarsen.Coarsening:
    limits = [s.memory for s in specs if s.memory is not None]
    mem_cap = min(limits) / 4 if limits else float("inf")
    return _coarsen.coarsen(graph, len(specs), fraction=fraction, mem_cap=mem_cap)


def _finish(
    graph: nx.DiGraph,
    g: Indexed,
    stage: list[int],
    specs: Sequence[DeviceSpec],
    bound: float,
    status: str,
    solver: str,
    t0: float,
    meta: dict[str, Any],
    kw: dict[str, Any],
) -> Plan:
    log.debug("solve: %s, bound %s, %s", status, bound, meta)
    return make_plan(
        graph,
        dict(zip(g.names, stage, strict=True)),
        specs,
        lower_bound=bound,
        status=status,
        solver=solver,
        solve_time=time.perf_counter() - t0,
        meta=meta,
        **kw,
    )


__all__ += ["Level"]
