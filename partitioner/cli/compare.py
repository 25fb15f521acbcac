"""``modelsplit compare``: the ILP plan beside each baseline, on one profiled graph."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from partitioner.cli.common import (
    fit_chunks,
    load_setup,
    planner_options,
    profile_setup,
    quiet_stdout,
    solve_plan,
)
from partitioner.cli.output import Output
from partitioner.cli.render import fmt_bytes, fmt_time, plain_table
from partitioner.errors import InfeasiblePlanError, ModelSplitError
from partitioner.loader import UsageError
from partitioner.planner.baselines import POLICIES, baseline
from partitioner.planner.plan import Plan

__all__ = ["compare"]


def _compare_row(
    name: str, plan: Plan | None, ilp: Plan | None, error: Exception | None = None
) -> dict[str, Any]:
    if plan is None:
        status = "infeasible" if isinstance(error, InfeasiblePlanError) else "failed"
        return {"policy": name, "status": status, "error": " ".join(str(error).split())}
    ratio = plan.bottleneck / ilp.bottleneck if ilp is not None and ilp.bottleneck > 0 else None
    return {
        "policy": name,
        "status": plan.status,
        "stages": plan.num_stages,
        "bottleneck": plan.bottleneck,
        "ratio": ratio,
        "comm_bytes": plan.comm_bytes,
        "memory": [s.memory for s in plan.stages],
        "devices": plan.devices,
    }


def _compare_table(rows: list[dict[str, Any]]) -> Any:
    table = plain_table()
    for name in ("plan", "status", "stages", "bottleneck", "x ILP", "communicated", "memory"):
        justify = "left" if name in ("plan", "status", "memory") else "right"
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        if "bottleneck" not in row:
            table.add_row(row["policy"], row["status"], "-", "-", "-", "-", row["error"][:60])
            continue
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        table.add_row(
            row["policy"],
            row["status"],
            str(row["stages"]),
            fmt_time(row["bottleneck"]),
            ratio,
            fmt_bytes(row["comm_bytes"]),
            ", ".join(fmt_bytes(m) for m in row["memory"]),
        )
    return table


def compare(args: argparse.Namespace, out: Output) -> int:
    """The ILP plan and each baseline on one profiled graph, side by side."""
    opts = planner_options(args)
    policies = (
        POLICIES if not args.policies else tuple(p.strip() for p in args.policies.split(","))
    )
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise UsageError(f"--policies: unknown {unknown}; choose from {', '.join(POLICIES)}")
    with out.progress(4 + len(policies)) as step:
        step(f"loading {args.model}")
        setup = load_setup(args)
        opts = replace(opts, chunks=fit_chunks(setup, opts.chunks, opts.given_chunks, out))
        graph = profile_setup(setup, args, opts, step)
        step(f"solving ({graph.number_of_nodes()} nodes, time limit {args.time_limit:g}s)")
        try:
            ilp: Plan | None = solve_plan(graph, setup, args, opts)
            rows = [_compare_row("ilp", ilp, ilp)]
        except InfeasiblePlanError as e:
            ilp, rows = None, [_compare_row("ilp", None, None, e)]
        for policy in policies:
            step(f"baseline {policy}")
            try:
                with quiet_stdout(args.debug):
                    plan = baseline(graph, opts.devices, policy, bandwidth=opts.bandwidth)
                rows.append(_compare_row(policy, plan, ilp))
            except ModelSplitError as e:  # a policy that cannot meet the memory limits
                rows.append(_compare_row(policy, None, ilp, e))
    out.data(rows)
    out.show(_compare_table(rows))
    if ilp is None:
        raise InfeasiblePlanError(rows[0]["error"])
    return 0
