"""How named values flow through the stages: split stages (StageIO) or a plain sequence.

A `Route` gives every value a name, says which stage produces it (-1: the caller) and
after which stage nobody needs it anymore, so the pipeline keeps one small environment
``{name: value}`` per micro-batch. Two kinds of stages map onto it:

- stages from `partitioner.splitting.cut`, which carry a `StageIO` (see [Note: stage interface]);
- plain modules run as a sequence, like torchgpipe: stage 0 takes the call's arguments,
  the output of stage j feeds stage j+1, a tuple is splatted into positional arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from runtime.interface import Const, StageIO

__all__ = ["CALLER", "Route", "plain_route", "route_for", "stageio_route"]

# The producer index of the caller's inputs.
CALLER = -1

Call = Callable[[nn.Module, Sequence[Any]], tuple[Any, ...]]


@dataclass(frozen=True)
class Route:
    """Names read and written by each stage, and how the call binds and the output rebuilds."""

    inputs: tuple[str, ...]
    stage_inputs: tuple[tuple[str, ...], ...]
    stage_outputs: tuple[tuple[str, ...], ...]
    output_leaves: tuple[str | Const, ...]
    bind: Callable[[Sequence[Any], Mapping[str, Any]], dict[str, Any]]
    unflatten: Callable[[list[Any]], Any]
    calls: tuple[Call, ...]
    writes: tuple[tuple[str, str], ...] = ()  # [Note: writes to model inputs]

    @property
    def producer(self) -> dict[str, int]:
        """Value name -> index of the stage that produces it (`CALLER` for model inputs)."""
        where = dict.fromkeys(self.inputs, CALLER)
        for j, names in enumerate(self.stage_outputs):
            where.update(dict.fromkeys(names, j))
        return where

    def free_after(self) -> list[tuple[str, ...]]:
        """Names nobody reads after stage j: entry j+1 of the list (entry 0: after binding)."""
        n = len(self.stage_inputs)
        kept = {leaf for leaf in self.output_leaves if isinstance(leaf, str)}
        last = dict.fromkeys(self.producer, CALLER)
        for j, names in enumerate(self.stage_inputs):
            last.update(dict.fromkeys(names, j))
        free: list[list[str]] = [[] for _ in range(n + 1)]
        for name, j in last.items():
            if name not in kept:
                free[max(j, self.producer[name]) + 1].append(name)
        return [tuple(names) for names in free]

    def validate(self) -> None:
        """Every value is produced before it is read; a ValueError names the first that is not."""
        known = set(self.inputs)
        for j, (ins, outs) in enumerate(zip(self.stage_inputs, self.stage_outputs, strict=True)):
            missing = [name for name in ins if name not in known]
            if missing:
                raise ValueError(
                    f"stage {j} reads {missing}, which no model input or earlier stage produces"
                )
            known.update(outs)
        missing = [leaf for leaf in self.output_leaves if isinstance(leaf, str)]
        missing = [name for name in missing if name not in known]
        if missing:
            raise ValueError(f"the model output reads {missing}, which no stage produces")


def _stageio_call(j: int, n_out: int) -> Call:
    def call(stage: nn.Module, values: Sequence[Any]) -> tuple[Any, ...]:
        out = stage(*values)
        if not isinstance(out, tuple) or len(out) != n_out:
            got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
            raise TypeError(f"stage {j} must return a tuple of {n_out} values (got {got})")
        return out

    return call


def stageio_route(ios: Sequence[StageIO]) -> Route:
    """The route of stages built by `partitioner.splitting.cut`."""
    program = ios[0].program
    for j, io in enumerate(ios):
        if io.stage != j:
            raise ValueError(f"stage {j} carries the StageIO of stage {io.stage}: wrong order?")
        if io.program is not program:
            raise ValueError(f"stage {j} comes from another split than stage 0")
    return Route(
        inputs=tuple(program.inputs),
        stage_inputs=tuple(tuple(io.inputs) for io in ios),
        stage_outputs=tuple(tuple(io.outputs) for io in ios),
        output_leaves=tuple(program.output_leaves),
        bind=program.bind,
        unflatten=program.unflatten,
        calls=tuple(_stageio_call(j, len(io.outputs)) for j, io in enumerate(ios)),
        writes=tuple(program.writes),
    )


def _first_call(stage: nn.Module, values: Sequence[Any]) -> tuple[Any, ...]:
    args, kwargs = values
    return (stage(*args, **kwargs),)


def _next_call(stage: nn.Module, values: Sequence[Any]) -> tuple[Any, ...]:
    (value,) = values
    return (stage(*value) if isinstance(value, tuple) else stage(value),)


def _bind_call(args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {"args": tuple(args), "kwargs": dict(kwargs)}


def plain_route(n: int) -> Route:
    """The route of n plain modules run one after the other."""
    outs = tuple((f"out{j}",) for j in range(n))
    return Route(
        inputs=("args", "kwargs"),
        stage_inputs=(("args", "kwargs"), *outs[:-1]),
        stage_outputs=outs,
        output_leaves=outs[-1],
        bind=_bind_call,
        unflatten=lambda leaves: leaves[0],
        calls=(_first_call, *[_next_call] * (n - 1)),
    )


def route_for(stages: Sequence[nn.Module]) -> Route:
    """The route of ``stages``: all split stages (with a StageIO) or all plain modules."""
    metas = [getattr(stage, "meta", None) for stage in stages]
    ios = [meta.get("modelsplit") if isinstance(meta, dict) else None for meta in metas]
    carried = [isinstance(io, StageIO) for io in ios]
    if all(carried):
        route = stageio_route([io for io in ios if isinstance(io, StageIO)])
    elif not any(carried):
        route = plain_route(len(stages))
    else:
        raise ValueError(
            f"stages {[j for j, c in enumerate(carried) if c]} come from partitioner.split "
            f"and the others do not: pass either split stages or plain modules"
        )
    route.validate()
    return route
