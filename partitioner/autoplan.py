"""auto_partition: trace -> profile -> solve, for one input signature of a model."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from partitioner.capture.batching import check_batch_independence
from partitioner.capture.checks import batch_size
from partitioner.capture.tracer import input_signature, trace
from partitioner.devices import MemoryLike, resolve_devices, torch_device
from partitioner.planner.candidates import training_choice
from partitioner.planner.cost import DEFAULT_BANDWIDTH, Bandwidth, DeviceSpec
from partitioner.planner.plan import Plan, default_chunks
from partitioner.planner.solver import solve
from partitioner.profiling.costgraph import profile
from partitioner.replan import HostCopy, StateDictSource
from partitioner.splitting.compose import share_tensors
from runtime.worker import available_cores, stage_threads

__all__ = [
    "Compiled",
    "Options",
    "auto_partition",
    "capture",
    "check_options",
    "profile_for",
    "same_graph",
    "signature_key",
    "trace_profile_solve",
    "weight_source",
]

log = logging.getLogger(__name__)


@dataclass
class Compiled:
    """One traced, planned and split model for one input signature."""

    plan: Plan
    stages: list[torch.fx.GraphModule]
    pipeline: Any
    graph: Any  # the CostGraph, kept for re-planning without re-profiling
    gm: Any = None  # the traced module, kept for re-splitting after a failure
    generation: int = 0  # the device set it was planned for (see ModelSplitter.revive)
    #: the smallest micro-batch verified against the unsplit model (None: not verified)
    verified: int | None = None
    #: its chunking.Cut (None: the splitter's chunks): [Note: choosing micro-batches]
    cut: Any = None


def signature_key(args: Sequence[Any], kwargs: Mapping[str, Any], training: bool) -> Any:
    """Input structure without the batch size: a new batch size reuses the plan. A size-1
    tensor that broadcasts beside a larger batch is another structure than a batched one."""
    batch = batch_size(tuple(args), dict(kwargs))

    def leaf(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            kind = "T1" if x.dim() >= 1 and x.shape[0] == 1 and (batch or 1) > 1 else "T"
            return (kind, tuple(x.shape[1:]), str(x.dtype), x.dim())
        if isinstance(x, list | tuple):
            return (type(x).__name__, tuple(leaf(v) for v in x))
        if isinstance(x, dict):
            return ("dict", tuple((k, leaf(v)) for k, v in sorted(x.items())))
        return ("C", repr(x))

    return (leaf(tuple(args)), leaf(dict(kwargs)), training)


@dataclass(frozen=True)
class Options:
    """How to trace, profile and solve; shared by ModelSplitter and auto_partition."""

    objective: str = "throughput"
    bandwidth: Bandwidth = DEFAULT_BANDWIDTH
    solver: str | None = None
    time_limit: float = 30.0
    gap: float = 0.01
    imbalance: float = 0.05
    trace_mode: str = "auto"
    leaf_modules: tuple[Any, ...] = ()
    cost: str = "time"
    schedule: str | None = None  # train_step's; None: GPipe or 1F1B, one stage per device
    checkpoint: bool = False  # whether the runtime recomputes (ModelSplitter's checkpoint)


def trace_profile_solve(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    specs: list[DeviceSpec],
    chunks: int,
    opts: Options,
    plan: Plan | None = None,
    reducer: Any = None,
) -> tuple[torch.fx.GraphModule, Any, Plan]:
    """trace -> profile -> solve; with a given ``plan``, validate it instead of solving.

    Before profiling, the model must give one output for the whole batch and for its
    ``chunks`` micro-batches ([Note: batch independence]).
    """
    t0 = time.perf_counter()
    gm = capture(model, args, kwargs, opts.leaf_modules, opts.trace_mode)
    check_batch_independence(
        model, args, kwargs, chunks, reducer, as_stages=lambda: stage_thread_count(specs)
    )
    t1 = time.perf_counter()
    graph = profile_for(gm, args, kwargs, specs, chunks, opts.cost)
    t2 = time.perf_counter()
    if plan is not None:
        plan.validate(graph.nodes, graph)
        log.info("trace %.2fs, profile %.2fs, plan given", t1 - t0, t2 - t1)
        return gm, graph, plan
    plan = solve(
        graph,
        specs,
        bandwidth=opts.bandwidth,
        objective=opts.objective,
        imbalance=opts.imbalance,
        solver=opts.solver,
        time_limit=opts.time_limit,
        gap=opts.gap,
        chunks=chunks,
        signature=input_signature(tuple(args), dict(kwargs)),
        model=type(model).__name__,
        **training_choice(graph, opts.schedule, opts.checkpoint),
    )
    log.info(
        "trace %.2fs, profile %.2fs, solve %.2fs (%s, %s, gap %.2f%%)",
        t1 - t0,
        t2 - t1,
        time.perf_counter() - t2,
        plan.solver,
        plan.status,
        100 * plan.gap,
    )
    return gm, graph, plan


def capture(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    leaf_modules: Sequence[Any] = (),
    mode: str = "auto",
) -> torch.fx.GraphModule:
    """`trace`, with the traced module holding the model's own weights."""
    gm = trace(model, tuple(args), dict(kwargs), leaf_modules=leaf_modules, mode=mode)
    share_tensors(gm, model)
    return gm


def profile_for(
    gm: torch.fx.GraphModule,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    specs: Sequence[DeviceSpec],
    chunks: int,
    cost: str = "time",
) -> Any:
    """`profile` as the stages will run: with the intra-op threads a CPU stage worker gets.

    The one profiling path of ModelSplitter, auto_partition and the CLI, so a plan made on
    the command line is the plan the API makes.
    """
    with stage_thread_count(specs):
        return profile(gm, tuple(args), dict(kwargs), chunks=chunks, cost=cost)


@contextlib.contextmanager
def stage_thread_count(specs: Sequence[DeviceSpec]) -> Iterator[None]:
    """Run (profile, check) with the intra-op threads a CPU stage worker will have.

    Each CPU worker runs with max(1, cores // CPU stages) threads (see
    runtime.worker.stage_threads); timing nodes with all cores would measure a speed
    no stage sees, and on a busy machine idle OpenMP threads inflate small ops.
    """
    counts = stage_threads([torch_device(s.name) for s in specs], available_cores(), None)
    cpu = [c for c in counts if c is not None]
    before = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(cpu[0])
    try:
        yield
    finally:
        torch.set_num_threads(before)


def weight_source(
    on_failure: str, recovery: str, path: str | None
) -> HostCopy | StateDictSource | None:
    """Where lost weights come back from after a failure ([Note: re-planning])."""
    if on_failure != "replan":
        return None
    return StateDictSource(path) if recovery == "state-dict" and path else HostCopy()


def auto_partition(
    model: nn.Module,
    example_inputs: Sequence[Any],
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    num_devices: int | None = None,
    devices: Sequence[str | torch.device | DeviceSpec] | None = None,
    memory: MemoryLike = None,
    speed: Sequence[float] | None = None,
    chunks: int | None = None,
    objective: str = "throughput",
    bandwidth: Bandwidth = DEFAULT_BANDWIDTH,
    solver: str | None = None,
    time_limit: float = 30.0,
    gap: float = 0.01,
    imbalance: float = 0.05,
    trace_mode: str = "auto",
    leaf_modules: Sequence[Any] = (),
    cost: str = "time",
) -> Plan:
    """Trace, profile and solve: the partition Plan for ``model`` on the devices.

    ``chunks`` (micro-batches) defaults to 1 for a model in eval mode and, for one in
    training mode (a training plan: its step time), to ModelSplitter's default, two per
    device: with one micro-batch no two stages of a training step ever work at once.
    """
    specs = resolve_devices(num_devices, devices, memory, speed)
    if chunks is None:
        chunks = default_chunks(len(specs)) if model.training else 1
    opts = Options(
        objective,
        bandwidth,
        solver,
        time_limit,
        gap,
        imbalance,
        trace_mode,
        tuple(leaf_modules),
        cost,
    )
    _, _, plan = trace_profile_solve(
        model, tuple(example_inputs), dict(example_kwargs or {}), specs, chunks, opts
    )
    return plan


def check_options(
    chunks: int | None,
    on_failure: str,
    recovery: str,
    state_dict_path: str | None,
    stage_timeout: float | None,
    backward: str,
    schedule: str | None = None,
) -> None:
    """ModelSplitter's run options, checked before anything is traced."""
    from partitioner.planner.schedules import SCHEDULES

    if schedule is not None and schedule not in ("auto", *SCHEDULES):
        raise ValueError(
            f"schedule must be None (GPipe or 1F1B, one stage per device), 'auto' or one of "
            f"{', '.join(SCHEDULES)} (got {schedule!r})"
        )
    if chunks is not None and (isinstance(chunks, bool) or chunks < 1):
        raise ValueError(f"chunks must be a positive integer ({chunks} < 1)")
    if on_failure not in ("raise", "replan"):
        raise ValueError(f"on_failure must be 'raise' or 'replan' (got {on_failure!r})")
    if recovery not in ("host-copy", "state-dict"):
        raise ValueError(f"recovery must be 'host-copy' or 'state-dict' (got {recovery!r})")
    if recovery == "state-dict" and state_dict_path is None:
        raise ValueError("recovery='state-dict' needs state_dict_path (a torch.save file)")
    if stage_timeout is not None and not stage_timeout > 0:
        raise ValueError(f"stage_timeout must be positive seconds ({stage_timeout!r})")
    if backward not in ("autograd", "pipelined"):
        raise ValueError(f"backward must be 'autograd' or 'pipelined' (got {backward!r})")
    if backward == "pipelined" and on_failure == "replan":
        raise ValueError(
            "backward='pipelined' cannot re-run lost micro-batches (on_failure='replan'): "
            "use backward='autograd' with it"
        )


def same_graph(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    """Whether a plan for ``b`` applies to ``a``: the same nodes, ops and inputs."""

    def structure(gm: torch.fx.GraphModule) -> list[tuple[str, str, str, tuple[str, ...]]]:
        return [
            (n.name, n.op, str(n.target), tuple(x.name for x in n.all_input_nodes))
            for n in gm.graph.nodes
        ]

    return structure(a) == structure(b)
