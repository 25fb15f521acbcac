"""Re-plan a split model on the devices that survive a failure.

[Note: re-planning]
When a device fails (`runtime.recovery.resume` calls `ModelSplitter`'s re-plan), the splitter:

1. marks the device dead: it leaves the devices offered to every later plan;
2. re-solves from the cached CostGraph on the survivors: no re-tracing, no re-profiling,
   only `solve` (with the same objective, bandwidth, time limit and micro-batch count);
3. re-splits the cached traced module with the new plan;
4. restores every weight that lived on the failed device from a host-side source of truth,
   then places each stage's weights on its new device;
5. builds the new pipeline, which re-runs the micro-batches that did not complete.

Sources of truth for step 4 (``recovery=``):

- ``"host-copy"`` (default): a CPU copy of every parameter and buffer that lives on an
  accelerator, refreshed at the start of each call for the tensors that changed since the
  last one (an optimizer step bumps their version). Cost: one full copy of the accelerator-
  resident weights in host RAM, and in training one device-to-host copy of them per step.
  On a CPU-only run the weights already live in host memory, which a failed CPU worker
  does not take with it: nothing extra is kept and nothing is copied.
- ``"state-dict"``: the lost tensors are read back from ``state_dict_path`` (a file saved
  with ``torch.save(model.state_dict(), path)``). Cost: a disk read at recovery, no memory
  while running; the weights come back as they were saved, so a training run should save
  there after its steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from partitioner.errors import InfeasiblePlanError
from partitioner.planner.cost import DeviceSpec, fmt_bytes
from partitioner.planner.plan import Plan
from runtime.recovery.faults import RecoveryError, lost_memory

__all__ = ["HostCopy", "ReplanTimes", "StateDictSource", "lost_tensors", "replan_plan"]

log = logging.getLogger(__name__)

NamedTensors = list[tuple[str, torch.Tensor]]


def _named_tensors(model: nn.Module) -> NamedTensors:
    """Every parameter and buffer once (a tied weight under its first name)."""
    seen: set[int] = set()
    out = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def lost_tensors(model: nn.Module, failed: str) -> NamedTensors:
    """The weights whose memory went with ``failed`` (none for a CPU worker)."""
    dead = lost_memory(failed)
    if dead is None:
        return []
    return [(n, t) for n, t in _named_tensors(model) if t.device == dead]


class HostCopy:
    """A CPU copy of the accelerator-resident weights, refreshed where they changed.

    ``include_cpu`` copies CPU tensors too (for tests; a CPU worker's failure leaves them).
    """

    def __init__(self, include_cpu: bool = False) -> None:
        self.include_cpu = include_cpu
        self._copies: dict[int, tuple[torch.Tensor, int, int]] = {}

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c, _, _ in self._copies.values())

    def refresh(self, model: nn.Module) -> None:
        """Copy each accelerator tensor whose version or storage changed since last time."""
        for _, t in _named_tensors(model):
            if t.device.type == "cpu" and not self.include_cpu:
                self._copies.pop(id(t), None)
                continue
            key = (t._version, t.data_ptr())
            held = self._copies.get(id(t))
            if held is not None and held[1:] == key:
                continue
            host = held[0] if held is not None and held[0].shape == t.shape else None
            if host is None:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            host.copy_(t.detach())
            self._copies[id(t)] = (host, *key)

    def restore(self, tensors: NamedTensors) -> None:
        for name, t in tensors:
            held = self._copies.get(id(t))
            if held is None:
                raise RecoveryError(f"no host copy of {name!r} to restore it from", [])
            t.data = held[0].clone()


@dataclass(frozen=True)
class StateDictSource:
    """Lost weights read back from a saved ``state_dict``."""

    path: str

    def restore(self, tensors: NamedTensors) -> None:
        if not tensors:
            return
        state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        for name, t in tensors:
            if name not in state:
                raise RecoveryError(
                    f"the state dict at {self.path} has no {name!r} to restore it from", []
                )
            t.data = state[name].detach().clone().to(t.dtype)


@dataclass(frozen=True)
class ReplanTimes:
    """Seconds spent in each phase of a re-plan."""

    solve: float
    split: float
    place: float

    @property
    def total(self) -> float:
        return self.solve + self.split + self.place


def survivors(specs: Sequence[DeviceSpec], failed: Sequence[str]) -> list[DeviceSpec]:
    return [s for s in specs if s.name not in set(failed)]


def _sub_bandwidth(bandwidth: Any, offered: Sequence[DeviceSpec], alive: list[DeviceSpec]) -> Any:
    if isinstance(bandwidth, int | float):
        return bandwidth
    index = {s.name: k for k, s in enumerate(offered)}
    keep = [index[s.name] for s in alive]
    return [[bandwidth[a][b] for b in keep] for a in keep]


def _need(graph: Any) -> str:
    """What the model needs, in words: its weights and one micro-batch's activations (a
    training profile's ``act_bytes`` are per micro-batch; how many are alive at once is the
    schedule's)."""
    params = sum(int(d["param_bytes"]) for _, d in graph.nodes(data=True))
    acts = sum(int(d["act_bytes"]) for _, d in graph.nodes(data=True))
    return f"{fmt_bytes(params)} of weights and {fmt_bytes(acts)} of activations per micro-batch"


def replan_plan(
    graph: Any,
    old: Plan,
    offered: Sequence[DeviceSpec],
    failed: Sequence[str],
    opts: Any,
) -> Plan:
    """Solve ``graph`` again on the ``offered`` devices that are not in ``failed``."""
    from partitioner.planner.candidates import training_choice
    from partitioner.planner.solver import solve

    alive = survivors(offered, failed)
    if not alive:
        raise RecoveryError(
            f"every device failed ({', '.join(failed)}); nothing is left to re-plan on "
            f"(the model needs {_need(graph)})",
            list(failed),
        )
    try:
        return solve(
            graph,
            alive,
            bandwidth=_sub_bandwidth(opts.bandwidth, offered, alive),
            objective=opts.objective,
            imbalance=opts.imbalance,
            solver=opts.solver,
            time_limit=opts.time_limit,
            gap=opts.gap,
            chunks=old.chunks,
            signature=old.signature,
            model=old.model,
            **training_choice(graph, opts.schedule, opts.checkpoint),
        )
    except InfeasiblePlanError as exc:
        names = ", ".join(s.name for s in alive)
        raise RecoveryError(
            f"after losing {', '.join(failed)} the model no longer fits the surviving "
            f"devices ({names}): {exc}",
            list(failed),
        ) from exc


def timed_replan(
    compiled: Any,
    model: nn.Module,
    offered: Sequence[DeviceSpec],
    failed: Sequence[str],
    opts: Any,
    source: HostCopy | StateDictSource | None,
    build: Any,
) -> ReplanTimes:
    """Steps 2 to 5 of [Note: re-planning], in place on ``compiled`` (plan, stages,
    pipeline); ``build(stages, plan)`` places the weights and makes the pipeline."""
    from partitioner.splitting.cut import split

    t0 = time.perf_counter()
    plan = replan_plan(compiled.graph, compiled.plan, offered, failed, opts)
    t1 = time.perf_counter()
    stages = split(compiled.gm, plan)
    t2 = time.perf_counter()
    lost = [nt for name in failed for nt in lost_tensors(model, name)]
    if lost:
        if source is None:
            raise RecoveryError(
                f"the weights on {', '.join(failed)} are lost and no source to restore "
                f"them was kept",
                list(failed),
            )
        source.restore(lost)
    compiled.plan, compiled.stages, compiled.pipeline = plan, stages, build(stages, plan)
    if compiled.verified is not None:  # a new split: the next call is verified again
        compiled.verified = 1 << 62  # ([Note: verifying the split])
    times = ReplanTimes(t1 - t0, t2 - t1, time.perf_counter() - t2)
    log.info(
        "re-planned on %s in %.3fs (solve %.3fs, split %.3fs, place %.3fs; %s weights "
        "restored); bottleneck %.3g s",
        ", ".join(plan.devices),
        times.total,
        times.solve,
        times.split,
        times.place,
        len(lost),
        plan.bottleneck,
    )
    return times
