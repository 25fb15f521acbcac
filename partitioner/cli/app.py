"""Command-line interface: ``modelsplit plan | show | run | compare``.

The CLI alone writes to the terminal: results on stdout (a table, or JSON with
``--json``), progress and notes on stderr. Exit codes: 0 ok, 1 error, 2 usage
error, 3 infeasible plan; an error is one line naming the problem and the fix
(``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import NoReturn

from partitioner.cli.commands import cmd_compare, cmd_plan, cmd_run, cmd_show
from partitioner.cli.output import Output
from partitioner.errors import InfeasiblePlanError, ModelSplitError
from partitioner.loader import UsageError

__all__ = ["EXIT_ERROR", "EXIT_INFEASIBLE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INFEASIBLE = 0, 1, 2, 3
FORMATS = ("table", "json", "dot")
COMMANDS = {"plan": cmd_plan, "show": cmd_show, "run": cmd_run, "compare": cmd_compare}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become `UsageError` (one line, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--json", action="store_true", help="print the result as JSON")
    group.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    group.add_argument("--debug", action="store_true", help="log details; show tracebacks")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL", help="path/to/file.py:factory or pkg.mod:factory"
    )
    parser.add_argument(
        "--factory-kwargs", metavar="JSON", help="keyword arguments of the factory"
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="SHAPE",
        help="shape of one positional input, batch first (repeat per input), e.g. 32,64",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        metavar="DTYPE",
        help="dtype of the inputs (once for all or once per input): float32, int64, "
        "int64:N draws integers from [0, N) (default float32; integers in [0, 2))",
    )
    parser.add_argument(
        "--kwargs",
        metavar="JSON",
        help='keyword arguments of forward; {"shape": [..], "dtype": ".."} makes a tensor',
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")


def _planner_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("devices and planner")
    group.add_argument(
        "--devices",
        required=True,
        metavar="N|NAMES",
        help="a count (cuda:0..N-1 if that many GPUs, else CPU workers) or names: cuda:0,cuda:1",
    )
    group.add_argument("--memory", metavar="BYTES", help="memory per device: 16GB or 16GB,8GB")
    group.add_argument("--speed", metavar="S", help="relative speed per device: 1 or 1,2")
    group.add_argument("--bandwidth", default="12GB/s", help="between devices (default 12GB/s)")
    group.add_argument("--objective", choices=("throughput", "balanced-cut"), default="throughput")
    group.add_argument("--imbalance", type=float, default=0.05, help="for balanced-cut")
    group.add_argument(
        "--chunks", type=int, metavar="M", help="micro-batches (default 2 x devices)"
    )
    group.add_argument(
        "--time-limit", type=float, default=30.0, metavar="S", help="solver seconds"
    )
    group.add_argument(
        "--gap", type=float, default=0.01, help="relative optimality gap to stop at"
    )
    group.add_argument(
        "--solver", choices=("highs", "cbc"), help="ILP solver (default: HiGHS, else CBC)"
    )
    group.add_argument("--cost", choices=("time", "flops"), default="time", help="node cost")
    group.add_argument("--trace-mode", choices=("auto", "fx", "export"), default="auto")


def _training_options(parser: argparse.ArgumentParser) -> None:
    from partitioner.planner.schedules import SCHEDULES

    group = parser.add_argument_group("training (docs/planner.md, Training plans)")
    group.add_argument(
        "--train",
        action="store_true",
        help="plan a training step: forward and backward costs, the schedule, micro-batches "
        "and recomputation of least predicted step time that fit --memory",
    )
    group.add_argument(
        "--schedule",
        choices=("auto", *SCHEDULES),
        help="with --train: the pipeline schedule (default auto: the fastest that fits)",
    )
    group.add_argument(
        "--virtual-stages",
        metavar="V",
        help="with --train: stages per device for interleaved-1f1b and zero-bubble "
        "(default auto: 1 or 2)",
    )
    group.add_argument(
        "--checkpoint",
        choices=("auto", "on", "off"),
        help="with --train: recompute each stage's forward in its backward (default auto: "
        "tried when --memory is given)",
    )


def _format_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table", help="how to print the plan")
    parser.add_argument("--svg", metavar="PATH", help="draw the plan with Graphviz `dot`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="modelsplit",
        description="Split a PyTorch model across devices: plan, show, run, compare.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plan", help="trace, profile and solve; print and save the plan")
    _model_options(p)
    _planner_options(p)
    _training_options(p)
    p.add_argument("-o", "--output", default="plan.json", help="plan file ('-' to not save)")
    _format_options(p)
    _common(p)

    p = sub.add_parser("show", help="print a saved plan")
    p.add_argument("plan", metavar="PLAN", help="a plan.json written by `modelsplit plan`")
    _format_options(p)
    _common(p)

    p = sub.add_parser("run", help="run a plan on random inputs, check it, time it")
    _model_options(p)
    p.add_argument("--plan", required=True, help="the plan.json to run")
    p.add_argument("--devices", metavar="NAMES", help="run on these devices instead of the plan's")
    p.add_argument("--chunks", type=int, metavar="M", help="micro-batches (default: the plan's)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    p.add_argument("--trace", metavar="PATH", help="write a Chrome/Perfetto timeline JSON")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the check")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of the check")
    p.add_argument(
        "--train",
        action="store_true",
        help="also check and time a training step: gradients of a loss on the outputs "
        "against the unsplit model's",
    )
    p.add_argument(
        "--backward",
        choices=("autograd", "pipelined"),
        default="autograd",
        help="with --train: autograd's backward, or each stage's in its worker (CPU)",
    )
    _common(p)

    p = sub.add_parser("compare", help="the ILP plan against each baseline")
    _model_options(p)
    _planner_options(p)
    p.add_argument("--policies", help="baselines to run, comma-separated (default: all)")
    _common(p)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not isinstance(exc, ModelSplitError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, InfeasiblePlanError):
        return EXIT_INFEASIBLE
    return EXIT_ERROR


@contextlib.contextmanager
def _logging(debug: bool, quiet: bool) -> Iterator[None]:
    """Route the library's log records to stderr for the length of one command."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("modelsplit: %(levelname)s: %(name)s: %(message)s"))
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING
    loggers = [logging.getLogger(name) for name in ("partitioner", "runtime")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(old)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (0 ok, 1 error, 2 usage, 3 infeasible)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    except UsageError as e:
        print(f"modelsplit: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    out = Output(quiet=args.quiet, as_json=args.json)
    handler = COMMANDS[args.command]
    with _logging(args.debug, args.quiet):
        try:
            return int(handler(args, out))
        except KeyboardInterrupt:
            print("modelsplit: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if debug:
                traceback.print_exc()
            hint = "" if debug or isinstance(e, ModelSplitError) else " (--debug shows where)"
            print(f"modelsplit: error: {_one_line(e)}{hint}", file=sys.stderr)
            return _exit_code(e)
