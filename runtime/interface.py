"""The stage interface shared by `partitioner.splitting.cut` and the runtimes.

[Note: stage interface]
`split(gm, plan)` returns one `torch.fx.GraphModule` per stage. Each carries a
`StageIO` in ``stage.meta["modelsplit"]``:

- Values are named. A model input is named after its placeholder in the traced
  graph; any other value after the fx node that produces it. Names are unique.
- ``stage(*values)`` takes the values named by ``inputs``, positionally, and
  returns a tuple of the values named by ``outputs`` (always a tuple). A stage
  returns exactly what later stages and the model output need; a value that
  skips stages is read by its consumer straight from its producer's outputs.
- ``program`` is the same object on every stage of one split: it maps the
  user's ``(args, kwargs)`` to the model inputs and rebuilds the user's output
  (tensor, tuple, dict, Hugging Face ``ModelOutput``) from the output leaves.

[Note: writes to model inputs]
A model may write to its own input (``x.mul_(2)``, ``x /= 255``): called unsplit it changes
the caller's tensor. A split model runs its stages on micro-batches, copies and clones of
that tensor, so the write would be lost. The tracer therefore adds, for each input some op
writes, an output leaf holding the input's value at the end of ``forward`` (a clone made
after every write: `partitioner.capture.inplace.persist_input_writes`), named in
``Program.writes`` beside the input. ``unflatten`` ignores those leaves; whoever rebuilds the
user's output from a call's gathered leaves calls `write_back`, which copies each into the
caller's own tensor, as the model would have written it: `run_program`, `run_stages` and
`Pipeline.run` do. The paths that rebuild outputs per micro-batch or on other processes
(`Pipeline.train_step`, resuming a call after a lost device, the distributed backend) refuse
such a program with an error saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Const",
    "Program",
    "StageIO",
    "check_written",
    "refuse_writes",
    "stage_io",
    "write_back",
]


@dataclass(frozen=True)
class Const:
    """A constant leaf of the model output (not produced by any stage)."""

    value: Any


@dataclass(frozen=True)
class Program:
    """How the user's call maps onto named values, and the output back.

    ``bind(args, kwargs)`` returns ``{model input name: value}``, one entry per
    name in ``inputs``. ``output_leaves`` are value names (or `Const`), and
    ``unflatten(leaves)`` rebuilds the user-facing output from their values.
    """

    inputs: tuple[str, ...]
    output_leaves: tuple[str | Const, ...]
    bind: Callable[[Sequence[Any], Mapping[str, Any]], dict[str, Any]]
    unflatten: Callable[[list[Any]], Any]
    #: (model input name, output leaf holding its value after the call) for each input the
    #: model writes to: [Note: writes to model inputs]
    writes: tuple[tuple[str, str], ...] = ()


def write_back(
    writes: Sequence[tuple[str, str]],
    output_leaves: Sequence[str | Const],
    inputs: Mapping[str, Any],
    leaves: Sequence[Any],
) -> None:
    """Copy each written input's final value (among the call's gathered ``leaves``, in the
    order of ``output_leaves``) into the caller's tensor ``inputs[name]``, in the caller's
    grad mode, as the model's own in-place write would have ([Note: writes to model
    inputs])."""
    where = {leaf: k for k, leaf in enumerate(output_leaves) if isinstance(leaf, str)}
    for name, leaf in writes:
        inputs[name].copy_(leaves[where[leaf]])


def check_written(
    writes: Sequence[tuple[str, str]], inputs: Mapping[str, Any], sizes: Sequence[int]
) -> None:
    """A ValueError for a written input that micro-batches (of ``sizes`` rows) do not split (no
    batch dimension): each micro-batch would write all of it, where the model writes it once,
    and there are no rows to gather its new value from."""
    batch = sum(sizes)
    for name, _ in writes:
        shape = getattr(inputs[name], "shape", ())
        if not shape or shape[0] != batch:
            raise ValueError(
                f"the model writes to its input {name!r} in place, which has no batch "
                f"dimension (shape {tuple(shape)}, batch {batch}): every micro-batch would "
                f"write all of it where the model writes it once; copy it in forward first "
                f"({name} = {name}.clone()) or compute out of place"
            )


def refuse_writes(writes: Sequence[tuple[str, str]], what: str) -> None:
    """A ValueError when ``what`` cannot write a model's input writes back."""
    if writes:
        names = ", ".join(repr(name) for name, _ in writes)
        raise ValueError(
            f"the model writes to its input {names} in place (e.g. x.mul_(2)); {what} "
            f"cannot write that back into the caller's tensor, so the input would keep "
            f"values the model changes: copy the input in forward first (x = x.clone()) "
            f"or compute out of place (x = x * 2)"
        )


@dataclass(frozen=True)
class StageIO:
    """What one stage reads and returns; see [Note: stage interface]."""

    stage: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    program: Program


def stage_io(stage: Any) -> StageIO:
    """The `StageIO` of a stage module, or a TypeError saying where it comes from."""
    meta = getattr(stage, "meta", None)
    io = meta.get("modelsplit") if isinstance(meta, dict) else None
    if not isinstance(io, StageIO):
        raise TypeError(
            f"{type(stage).__name__} carries no stage interface: build stages with "
            f"partitioner.split(gm, plan), which sets stage.meta['modelsplit']"
        )
    return io
