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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Const", "Program", "StageIO", "stage_io"]


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
