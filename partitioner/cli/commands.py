"""The CLI's commands, each ``(args, out) -> exit code``: plan, show, run and compare."""

from __future__ import annotations

import argparse
from dataclasses import replace

import networkx as nx
from rich.markup import escape

from partitioner.cli.common import (
    check_memory,
    fit_chunks,
    load_setup,
    planner_options,
    profile_setup,
    solve_plan,
)
from partitioner.cli.compare import compare
from partitioner.cli.output import Output
from partitioner.cli.render import plan_to_dot, render_svg, stage_table, summary
from partitioner.cli.run import run_plan
from partitioner.planner.plan import Plan

__all__ = ["cmd_compare", "cmd_plan", "cmd_run", "cmd_show"]


def print_plan(plan: Plan, out: Output, fmt: str, graph: nx.DiGraph | None = None) -> None:
    if out.as_json:
        out.data(plan.to_dict())
    elif fmt == "json":
        out.raw(plan.to_json())
    elif fmt == "dot":
        out.raw(plan_to_dot(plan, graph))
    else:  # the plan's own strings (model, solver, names) are text, never rich markup
        title = f"{escape(plan.model or 'plan')} on {plan.num_stages} stages"
        out.show(stage_table(plan, title=title))
        out.show("")
        for label, value in summary(plan):
            out.show(f"[bold]{label:>13}[/bold]  {escape(value)}")


def write_svg(plan: Plan, path: str, out: Output, graph: nx.DiGraph | None = None) -> None:
    """Render the plan picture; when Graphviz is missing, keep the .dot file and say so."""
    from partitioner.cli.render import RenderError

    dot = plan_to_dot(plan, graph)
    try:
        render_svg(dot, path)
    except RenderError:
        dot_path = path.removesuffix(".svg") + ".dot"
        with open(dot_path, "w", encoding="utf-8") as f:
            f.write(dot)
        out.note(f"wrote {dot_path} (render it with: dot -Tsvg {dot_path} -o {path})")
        raise
    out.note(f"wrote {path}")


def cmd_plan(args: argparse.Namespace, out: Output) -> int:
    opts = planner_options(args)
    with out.progress(4) as step:
        step(f"loading {args.model}")
        setup = load_setup(args)
        opts = replace(opts, chunks=fit_chunks(setup, opts.chunks, opts.given_chunks, out))
        check_memory(setup, opts.devices)
        graph = profile_setup(setup, args, opts, step)
        step(f"solving ({graph.number_of_nodes()} nodes, time limit {args.time_limit:g}s)")
        plan = solve_plan(graph, setup, args, opts)
    print_plan(plan, out, args.format, graph)
    if args.output != "-":
        plan.save(args.output)
        out.note(f"wrote {args.output}")
    if args.svg:
        write_svg(plan, args.svg, out, graph)
    return 0


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    # Plan.load reads only a regular file of at most 64 MiB, as JSON: no code runs, a FIFO
    # or /dev/zero is refused before it is opened, and any fault is one PlanError line.
    plan = Plan.load(args.plan)
    print_plan(plan, out, args.format)
    if args.svg:
        write_svg(plan, args.svg, out)
    return 0


def cmd_run(args: argparse.Namespace, out: Output) -> int:
    return run_plan(args, out)


def cmd_compare(args: argparse.Namespace, out: Output) -> int:
    return compare(args, out)
