"""Relay stages: every value a later stage needs travels one stage at a time.

[Note: relay]
torch.distributed.pipelining sends the outputs of stage k to stage k+1 only, as
one flat tuple of tensors. A split stage may read values produced anywhere
before it: a skip connection from stage 1 to stage 3, or a model input (an
attention mask) read by every layer. `relay` wraps each stage so that it takes
every value live at its left boundary and returns every value live at its right
boundary, passing untouched the ones it does not read::

    boundary k = values produced at a stage <= k (model inputs: before stage 0)
                 and read at a stage > k (the model output: after the last one)

      x ─► [stage 0] ─ h, x ─► [stage 1] ─ g, x ─► [stage 2] ─► y = f(g) + x
                                  x skips stage 1: it is passed through

A relayed value is sent once per boundary it crosses, while the plan's
``comm_bytes`` counts it once per stage that reads it: a value skipping s
stages costs s extra hops the planner did not price. Gradients flow back the
same way (autograd adds a passed-through value's gradient to the stage's own).

``zero-bubble`` (torch's ``stage_backward_input``) splits a stage's backward in two and,
between the halves, detaches the stage's outputs in place. Autograd refuses that for a view
(``h.view(n, -1)`` returned as it is), and a tensor the stage also saved for its weight
gradient (a passed-through input a Linear reads, a skip value used again inside the stage)
then fails the second half ("saved tensor that has been detached in-place"); and the input
gradients it sends back come straight from ``autograd.grad``, possibly strided, which gloo
refuses to send ("input tensor has to be contiguous"). Built with ``split_backward=True`` a
relay stage returns a copy of every output that is a view or needs a gradient, and makes
its inputs' gradients contiguous: an extra copy of the stage's outputs per micro-batch,
paid by zero-bubble only.

Only tensors can be sent. A Python ``int``, ``float`` or ``bool`` crossing a
boundary (``x.size(0)`` in a traced graph) travels as a 0-dim tensor and is
turned back into a number on receipt; any other non-tensor value (None, a
tuple, a string) raises `ModelSplitError` naming it. The kind of each value is
learnt by `dry_run`, which runs the stages once, in order, on one example
micro-batch; the shapes it sees are handed to the engine as static shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from partitioner.errors import ModelSplitError
from runtime.interface import Const, Program, StageIO, stage_io

__all__ = [
    "Boundaries",
    "RelayStage",
    "boundaries",
    "Examples",
    "dry_run",
    "rebuild_output",
    "relay",
]

log = logging.getLogger(__name__)

#: ``boundaries[k]``: names live between stage k-1 and stage k; ``[0]`` are the
#: model inputs and ``[n]`` the output leaves the last stage returns.
Boundaries = list[tuple[str, ...]]
#: Value kind: "tensor" or the Python number type it travels as a tensor for.
Kind = str

_NUMBERS: dict[type, Kind] = {bool: "bool", int: "int", float: "float"}


def boundaries(ios: Sequence[StageIO]) -> Boundaries:
    """The names each stage takes (``[k]``) and the last one returns (``[n]``)."""
    n = len(ios)
    if n == 0:
        raise ValueError("boundaries of an empty split: a plan has at least one stage")
    program = ios[0].program
    born: dict[str, int] = {name: -1 for name in program.inputs}
    order: list[str] = list(program.inputs)
    for j, io in enumerate(ios):
        if io.stage != j:
            raise ValueError(f"stage {j} carries the interface of stage {io.stage}")
        for name in io.outputs:
            if name not in born:
                born[name] = j
                order.append(name)
    last_read: dict[str, int] = {}
    for j, io in enumerate(ios):
        for name in io.inputs:
            if name not in born:
                raise ModelSplitError(f"stage {j} reads {name!r}, which no earlier stage makes")
            if born[name] >= j:
                raise ModelSplitError(
                    f"stage {j} reads {name!r}, made by stage {born[name]}: stages go backwards"
                )
            last_read[name] = j
    leaves = [leaf for leaf in program.output_leaves if isinstance(leaf, str)]
    for name in leaves:
        if name not in born:
            raise ModelSplitError(f"model output {name!r} is made by no stage")
        last_read[name] = n
    live = [tuple(v for v in order if born[v] < k <= last_read.get(v, -1)) for k in range(1, n)]
    return [program.inputs, *live, tuple(leaves)]


@dataclass
class Examples:
    """What `dry_run` learnt: each value's kind, and what crosses each boundary.

    ``boundary[k]`` holds stage k's encoded inputs (``[0]`` the model inputs,
    ``[n]`` the last stage's outputs) as meta-device tensors carrying the shape,
    stride, dtype and ``requires_grad`` of one micro-batch: the engine's static
    shapes, so it never runs a stage on uninitialised buffers to infer them.
    """

    kinds: dict[str, Kind]
    boundary: list[tuple[Any, ...]]


def dry_run(
    stages: Sequence[nn.Module], inputs: Mapping[str, Any], bounds: Boundaries
) -> Examples:
    """Run the stages once in order on ``inputs`` (one micro-batch, grad enabled, so each
    value's ``requires_grad`` is what training sees). RNG and buffers are restored."""
    buffers = [b for s in stages for b in s.buffers()]
    saved = [b.detach().clone() for b in buffers]
    env: dict[str, Any] = dict(inputs)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        for stage in stages:
            io = stage_io(stage)
            out = stage(*(env[name] for name in io.inputs))
            env.update(zip(io.outputs, _as_tuple(out), strict=True))
    with torch.no_grad():
        for b, value in zip(buffers, saved, strict=True):
            b.copy_(value)
    n = len(bounds) - 1
    kinds: dict[str, Kind] = {}
    for k in [*range(1, n), 0, n]:  # values sent between stages first: they must be tensors
        for name in bounds[k]:
            kinds.setdefault(name, _kind(name, env[name], k, sent=0 < k < n))
    boundary = [
        tuple(_meta(_encode(env[name], kinds[name], None)) for name in names) for names in bounds
    ]
    return Examples(kinds, boundary)


def _meta(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    t = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return t.requires_grad_(value.requires_grad and value.is_floating_point())


def _kind(name: str, value: Any, k: int, sent: bool = True) -> Kind:
    if isinstance(value, torch.Tensor):
        return "tensor"
    kind = _NUMBERS.get(type(value))
    if kind is None and isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        kind = type(value).__name__[3:].lower()
    if kind is None and sent:
        raise ModelSplitError(
            f"value {name!r} ({type(value).__name__}) crosses the boundary before stage {k}, "
            f"but torch.distributed.pipelining sends tensors only: move the node that makes it "
            f"into the stage that reads it (edit the plan's assignment) or return a tensor"
        )
    return kind or "object"


def _as_tuple(out: Any) -> tuple[Any, ...]:
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def _encode(value: Any, kind: Kind, device: torch.device | None) -> Any:
    if kind == "tensor":
        return value.contiguous()  # the engine sends dense buffers
    if kind == "object":
        return value
    return torch.tensor(value, device=device)


def _decode(value: Any, kind: Kind) -> Any:
    if kind == "int":
        return int(value.item())
    if kind == "float":
        return float(value.item())
    if kind == "bool":
        return bool(value.item())
    return value


class RelayStage(nn.Module):
    """A split stage that takes the values ``take`` and returns ``give``; see [Note: relay].

    The wrapped stage reads ``io.inputs`` among the values taken and adds
    ``io.outputs``; every name in ``give`` is returned, numbers as 0-dim tensors.
    """

    def __init__(
        self,
        stage: nn.Module,
        take: tuple[str, ...],
        give: tuple[str, ...],
        kinds: Mapping[str, Kind],
        *,
        first: bool,
        split_backward: bool = False,
    ) -> None:
        super().__init__()
        self.stage = stage
        self.io = stage_io(stage)
        self.take, self.give = take, give
        self.kinds = {name: kinds.get(name, "tensor") for name in (*take, *give)}
        self.first = first
        self.split_backward = split_backward

    def forward(self, *values: Any) -> tuple[Any, ...]:
        if len(values) != len(self.take):
            raise ModelSplitError(
                f"relay stage {self.io.stage} takes {len(self.take)} values "
                f"{list(self.take)}, got {len(values)}"
            )
        if self.split_backward and not self.first:
            values = tuple(_contiguous_grad(v) for v in values)
        env = dict(zip(self.take, values, strict=True))
        if not self.first:  # the first stage gets the user's values as they are
            env = {name: _decode(v, self.kinds[name]) for name, v in env.items()}
        out = self.stage(*(env[name] for name in self.io.inputs))
        env.update(zip(self.io.outputs, _as_tuple(out), strict=True))
        device = next((v.device for v in env.values() if isinstance(v, torch.Tensor)), None)
        out = tuple(_encode(env[name], self.kinds[name], device) for name in self.give)
        return tuple(_own(v) for v in out) if self.split_backward else out


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the gradient contiguous (for sending)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _contiguous_grad(value: Any) -> Any:
    """``value`` through `_ContiguousGrad` where it needs a gradient; see [Note: relay]."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return _ContiguousGrad.apply(value)
    return value


def _own(value: Any) -> Any:
    """A copy of ``value`` where ``detach_()`` of it would fail or harm the stage's backward:
    a view, or a tensor that needs a gradient; see [Note: relay]."""
    if isinstance(value, torch.Tensor) and (value._is_view() or value.requires_grad):
        return value.clone()
    return value


def relay(
    stages: Sequence[nn.Module], example: Mapping[str, Any], *, split_backward: bool = False
) -> tuple[list[RelayStage], Boundaries, Examples]:
    """Wrap split stages as relay stages; ``example`` maps each model input name to one
    micro-batch, run once through the stages by `dry_run`. ``split_backward``: copy the
    outputs and make input gradients contiguous (for ``zero-bubble``, see [Note: relay])."""
    ios = [stage_io(s) for s in stages]
    bounds = boundaries(ios)
    examples = dry_run(stages, example, bounds)
    wrapped = [
        RelayStage(
            s,
            bounds[j],
            bounds[j + 1],
            examples.kinds,
            first=j == 0,
            split_backward=split_backward,
        )
        for j, s in enumerate(stages)
    ]
    hops = sum(len(b) for b in bounds[1:-1])
    log.debug("relay: %s stages, %s values cross %s boundaries", len(stages), hops, len(ios) - 1)
    return wrapped, bounds, examples


def rebuild_output(
    program: Program, names: Sequence[str], leaves: Sequence[Any], kinds: Mapping[str, Kind]
) -> Any:
    """The user's output from the last stage's returned leaves (numbers decoded, Const
    leaves filled in)."""
    it = iter(_decode(v, kinds.get(name, "tensor")) for name, v in zip(names, leaves, strict=True))
    values = [
        leaf.value if isinstance(leaf, Const) else next(it) for leaf in program.output_leaves
    ]
    return program.unflatten(values)
