"""What the CLI's commands share: the model and its inputs, devices, planner options,
profiling and solving.

Each command parses every option first (a usage error costs no model load),
then loads the model, traces, profiles and solves with a progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from partitioner.cli.output import Output
from partitioner.loader import (
    DEFAULT_INT_HIGH,
    INT_DTYPES,
    UsageError,
    build_inputs,
    check_target,
    input_specs,
    load_model,
    parse_json,
)
from partitioner.planner.plan import Plan, default_chunks

if TYPE_CHECKING:
    import networkx as nx
    import torch
    from torch import nn

    from partitioner.loader import InputSpec
    from partitioner.planner.cost import DeviceSpec

__all__ = [
    "Setup",
    "check_memory",
    "fit_chunks",
    "load_setup",
    "parse_devices",
    "planner_options",
    "profile_setup",
    "quiet_stdout",
    "solve_plan",
]

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """A loaded model and its random example call."""

    model: nn.Module
    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, Any]
    specs: list[InputSpec]

    @property
    def batch(self) -> int:
        return int(self.args[0].shape[0]) if self.args else 1

    def describe(self) -> str:
        return ", ".join(s.describe() for s in self.specs)


@dataclass(frozen=True)
class PlannerOptions:
    devices: list[DeviceSpec]
    bandwidth: float
    chunks: int
    given_chunks: bool = True  # --chunks was on the command line (else: the default)
    training: dict[str, Any] | None = None  # with --train: solve's training options


def _usage(option: str, value: Any, exc: Exception) -> UsageError:
    return UsageError(f"{option} {value!r}: {' '.join(str(exc).split())}")


def parse_devices(
    text: str, memory: str | None = None, speed: str | None = None
) -> list[DeviceSpec]:
    """``--devices 4`` or ``--devices cuda:0,cuda:1`` with ``--memory`` and ``--speed``.

    The strings are checked before torch is imported, so a typo fails fast.
    """
    from partitioner.planner.cost import parse_bytes

    text = text.strip()
    count: int | None = None
    names: list[str] | None = None
    if text.lstrip("-").isdigit():
        count = int(text)
        if count > MAX_DEVICES:
            raise UsageError(
                f"--devices {text}: at most {MAX_DEVICES} devices (a plan puts at least one "
                f"graph node on each): pass the devices you have"
            )
        if count < 1:
            raise UsageError(
                f"--devices {text}: need at least one device; pass --devices 2 "
                f"or --devices cuda:0,cuda:1"
            )
    else:
        names = [t.strip() for t in text.split(",") if t.strip()]
        if not names:
            raise UsageError("--devices is empty: pass a count (--devices 2) or names")
    mem = _per_device("--memory", memory, parse_bytes)
    spd = _per_device("--speed", speed, float)
    from partitioner.devices import resolve_devices

    try:
        return resolve_devices(count, names, _one_or_all(mem), _one_or_all(spd))
    except (ValueError, RuntimeError) as e:
        raise _usage("--devices", text, e) from e


def _per_device(option: str, text: str | None, parse: Any) -> list[Any] | None:
    if text is None:
        return None
    try:
        values = [parse(t.strip()) for t in text.split(",")]
    except ValueError as e:
        raise _usage(option, text, e) from e
    if option == "--speed" and any(not v > 0 for v in values):
        raise UsageError(f"--speed {text!r}: every speed must be > 0")
    return values


def _one_or_all(values: list[Any] | None) -> Any:
    return values[0] if values is not None and len(values) == 1 else values


def planner_options(args: argparse.Namespace) -> PlannerOptions:
    from partitioner.planner.cost import parse_bytes

    try:
        bandwidth = float(parse_bytes(args.bandwidth))
        if bandwidth <= 0:
            raise ValueError("bandwidth must be > 0")
    except ValueError as e:
        raise _usage("--bandwidth", args.bandwidth, e) from e
    if args.chunks is not None and args.chunks < 1:
        raise UsageError(f"--chunks {args.chunks}: need at least one micro-batch")
    _check_numbers(args)
    parse_model_options(args)  # fail on a typo before torch is imported
    devices = parse_devices(args.devices, args.memory, args.speed)
    chunks = args.chunks if args.chunks is not None else default_chunks(len(devices))
    training = training_options(args)
    return PlannerOptions(devices, bandwidth, chunks, args.chunks is not None, training)


def training_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """`solve`'s training keywords from --train, --schedule, --virtual-stages, --checkpoint
    and --chunks (None without --train); a usage error for one that does not fit."""
    given = {
        name: getattr(args, name.replace("-", "_"), None)
        for name in ("schedule", "virtual-stages", "checkpoint")
    }
    if not getattr(args, "train", False):
        odd = [f"--{k}" for k, v in given.items() if v is not None]
        if odd:
            raise UsageError(f"{', '.join(odd)} applies to training plans: add --train")
        return None
    if getattr(args, "objective", "throughput") != "throughput":
        raise UsageError(
            f"--objective {args.objective} is for inference plans: a training plan minimises "
            "the step time (leave --objective out with --train)"
        )
    text = given["virtual-stages"] or "auto"
    virtual: int | str = "auto"
    if text != "auto":
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"--virtual-stages {text}: give auto or a whole number >= 1")
        virtual = int(text)
    schedule = given["schedule"] or "auto"
    if schedule in ("gpipe", "1f1b") and virtual not in ("auto", 1):
        raise UsageError(
            f"--schedule {schedule} runs one stage per device (--virtual-stages {virtual}): "
            "use interleaved-1f1b or zero-bubble for more"
        )
    checkpoint = {"on": True, "off": False}.get(given["checkpoint"] or "auto", "auto")
    chunks = args.chunks if args.chunks is not None else "auto"
    return dict(
        training=True,
        schedule=schedule,
        virtual_stages=virtual,
        checkpoint=checkpoint,
        chunks=chunks,
    )


def _check_numbers(args: argparse.Namespace) -> None:
    """The planner's numbers, checked before any work: a bad one is a usage error (exit 2)."""
    checks = {
        "time_limit": (lambda v: v > 0, "seconds > 0, e.g. --time-limit 30"),
        "gap": (lambda v: 0 <= v < 1, "a fraction in [0, 1), e.g. --gap 0.01"),
        "imbalance": (lambda v: v >= 0, "a fraction >= 0, e.g. --imbalance 0.05"),
    }
    for name, (ok, want) in checks.items():
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise UsageError(f"--{name.replace('_', '-')} {value:g}: give {want}")


#: more devices than this cannot be meant (and a plan uses at most one per graph node)
MAX_DEVICES = 4096


def parse_model_options(
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, Any], list[InputSpec]]:
    """MODEL, --factory-kwargs, --kwargs, --input-shape and --dtype, checked without torch."""
    check_target(args.model)
    factory_kwargs = parse_json(args.factory_kwargs, "--factory-kwargs")
    call_kwargs = parse_json(args.kwargs, "--kwargs")
    specs = input_specs(args.input_shape or [], args.dtype or [])
    return factory_kwargs, call_kwargs, specs


def load_setup(args: argparse.Namespace) -> Setup:
    """Parse the model options, load the model, and check that it takes the inputs."""
    factory_kwargs, call_kwargs, specs = parse_model_options(args)
    for text in args.dtype or ():
        if ":" not in text and text.strip().lower() in INT_DTYPES:
            log.warning(
                "--dtype %s: integers are drawn from [0, %d); give %s:N (a vocabulary size) "
                "for ids below N",
                text,
                DEFAULT_INT_HIGH,
                text,
            )
    model = load_model(args.model, factory_kwargs)
    model.eval()
    inputs, kwargs = build_inputs(specs, call_kwargs, seed=args.seed)
    setup = Setup(model, inputs, kwargs, specs)
    _check_forward(setup)
    return setup


def _check_forward(setup: Setup) -> None:
    import torch

    try:
        with torch.no_grad():
            setup.model(*setup.args, **setup.kwargs)
    except Exception as e:
        raise UsageError(
            f"{type(setup.model).__name__} rejects inputs of shape {setup.describe()} "
            f"({type(e).__name__}: {' '.join(str(e).split())}); pass the shapes and dtypes "
            f"its forward expects with --input-shape and --dtype"
        ) from e


def check_memory(setup: Setup, devices: list[DeviceSpec]) -> None:
    """Fail before tracing when the weights alone exceed the memory of all devices."""
    from partitioner.errors import InfeasiblePlanError
    from partitioner.planner.cost import fmt_bytes

    if any(d.memory is None for d in devices):
        return
    seen: dict[int, int] = {}
    for t in list(setup.model.parameters()) + list(setup.model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    need, have = sum(seen.values()), sum(d.memory or 0 for d in devices)
    if need > have:
        raise InfeasiblePlanError(
            f"{type(setup.model).__name__}'s weights need {fmt_bytes(need)} but the "
            f"{len(devices)} device(s) offer {fmt_bytes(have)} in all: raise --memory or "
            f"add devices"
        )


def fit_chunks(setup: Setup, chunks: int, given: bool, out: Output) -> int:
    """The micro-batch count for this batch: ``--chunks`` as given (more than the batch has
    rows is a usage error), or the default cut to the batch size, as ModelSplitter does."""
    if chunks <= setup.batch:
        return chunks
    if given:
        raise UsageError(
            f"--chunks {chunks} exceeds the batch size {setup.batch}: use a bigger batch "
            f"(first --input-shape dimension) or fewer chunks"
        )
    out.note(
        f"note: {setup.batch} micro-batches, one per row: the default {chunks} exceeds the "
        f"batch size {setup.batch} (give --chunks to choose)"
    )
    return setup.batch


def profile_setup(
    setup: Setup, args: argparse.Namespace, opts: PlannerOptions, step: Any
) -> nx.DiGraph:
    """Trace and profile as ModelSplitter does (one path: `partitioner.autoplan`)."""
    from partitioner.autoplan import capture, profile_for, stage_thread_count
    from partitioner.capture.batching import check_batch_independence

    step(f"tracing {type(setup.model).__name__}")
    gm = capture(setup.model, setup.args, setup.kwargs, mode=args.trace_mode)
    check_batch_independence(
        setup.model,
        setup.args,
        setup.kwargs,
        opts.chunks,
        as_stages=lambda: stage_thread_count(opts.devices),
    )
    if opts.training is not None:  # profile the training costs (bwd_time, saved tensors)
        gm.meta["modelsplit_training"] = True
    step(f"profiling {len(gm.graph.nodes)} nodes", hand_over=True)
    return profile_for(gm, setup.args, setup.kwargs, opts.devices, opts.chunks, args.cost)


@contextlib.contextmanager
def quiet_stdout(keep: bool = False) -> Iterator[None]:
    """Send what C libraries print on fd 1 (the HiGHS banner) to /dev/null, or to stderr
    with ``keep``, so stdout carries only the CLI's own output (``--json`` stays JSON)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream: nothing to guard
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    target = os.open(os.devnull, os.O_WRONLY) if not keep else os.dup(2)
    try:
        os.dup2(target, fd)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(target)


def solve_plan(
    graph: nx.DiGraph, setup: Setup, args: argparse.Namespace, opts: PlannerOptions
) -> Plan:
    from partitioner.capture.tracer import input_signature
    from partitioner.planner.solver import solve

    training: dict[str, Any] = opts.training or dict(training=False, chunks=opts.chunks)
    with quiet_stdout(args.debug):
        return solve(
            graph,
            opts.devices,
            bandwidth=opts.bandwidth,
            objective=args.objective,
            imbalance=args.imbalance,
            solver=args.solver,
            time_limit=args.time_limit,
            gap=args.gap,
            signature=input_signature(setup.args, setup.kwargs),
            model=type(setup.model).__name__,
            **training,
        )
