"""The ``"balanced-cut"`` objective: fewest bytes with every stage's compute near its share."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import networkx as nx

from partitioner.errors import InfeasiblePlanError
from partitioner.planner import coarsen as _coarsen
from partitioner.planner.bounds import fine_lower_bound
from partitioner.planner.cost import DeviceSpec, evaluate
from partitioner.planner.heuristics import Indexed, split_by_time
from partitioner.planner.ilp import solve_ilp
from partitioner.planner.levels import FINISH_RESERVE, level_of
from partitioner.planner.plan import Plan, make_plan

__all__ = ["balanced", "solve_balanced"]

log = logging.getLogger(__name__)


def balanced(
    graph: nx.DiGraph, stage: dict[str, int], specs: Sequence[DeviceSpec], imbalance: float
) -> bool:
    """Does every stage keep ``time_k / speed_k <= (1 + imbalance) * total / sum(speed)``?"""
    ev = evaluate(graph, stage, specs)
    total = sum(s.time for s in ev.stages)
    limit = (1 + imbalance) * total / sum(s.speed for s in specs)
    tol = 1e-9 * max(limit, 1e-30)
    return ev.valid and all(
        s.time / d.speed <= limit + tol for s, d in zip(ev.stages, specs, strict=True)
    )


def _named(g: Indexed, stage: Sequence[int]) -> dict[str, int]:
    return dict(zip(g.names, stage, strict=True))


def _no_plan(proven: bool, imbalance: float, time_limit: float) -> str:
    found = "keeps" if proven else f"was found in time_limit={time_limit} that keeps"
    return (
        f"no assignment {found} every stage within imbalance {imbalance} of its share and "
        "within memory; raise `imbalance` or use objective='throughput'"
    )


def solve_balanced(
    graph: nx.DiGraph,
    g: Indexed,
    specs: Sequence[DeviceSpec],
    solver: str,
    imbalance: float,
    time_limit: float,
    gap: float,
    coarsen: bool,
    t0: float,
    kw: dict[str, Any],
    fine_limit: int,
) -> Plan:
    bw = kw["bandwidth"]
    warm = split_by_time(g, specs)
    if warm is not None and not balanced(graph, _named(g, warm), specs, imbalance):
        warm = None
    limited = any(s.memory is not None for s in specs)
    level = level_of(_coarsen.reduce_exact(graph, limited), g)
    fine = not coarsen or level.n * len(specs) <= fine_limit
    if not fine:
        fraction = max(0.02, min(0.25, imbalance))
        level = level_of(_coarsen.coarsen(graph, len(specs), fraction=fraction), g)
    budget = t0 + time_limit - time.perf_counter() - FINISH_RESERVE  # see docs/planner.md
    res = solve_ilp(
        level.inp,
        specs,
        bw,
        objective="balanced-cut",
        imbalance=imbalance,
        solver=solver,
        time_limit=budget,
        gap=gap,
        start=level.start(warm) if warm is not None else None,
    )
    meta: dict[str, Any] = {"nodes": g.n, "coarse_nodes": level.n}
    if fine:
        meta["comm_seconds_bound"] = res.bound
    stage = level.fine(res.stage) if res.stage is not None else None
    if stage is not None and not balanced(graph, _named(g, stage), specs, imbalance):
        stage = None  # numerical slack in the ILP: do not return an unbalanced plan
    status = "optimal" if fine and res.proven else "feasible"
    if stage is None:
        if warm is None:
            raise InfeasiblePlanError(_no_plan(res.infeasible, imbalance, time_limit))
        log.warning("solve: the balanced-cut ILP returned no solution; using the time split")
        stage, status = warm, "heuristic"
    return make_plan(
        graph,
        _named(g, stage),
        specs,
        lower_bound=fine_lower_bound(graph, g, specs, bw, None),
        status=status,
        solver=solver,
        solve_time=time.perf_counter() - t0,
        meta=meta,
        **kw,
    )
