"""Per-task gradients: the pieces both backward runners share (`runtime.backward`, the
pipelined backward of a call, and `runtime.executor`, the training step of a schedule).

A task (micro-batch i, stage j) owns a graph of its own: it reads `detached` copies of its
inputs, its backward is ``torch.autograd.grad(outputs, inputs + parameters)``, the
parameter gradients are summed over micro-batches in the stage's worker (`accumulate`) and
over the stages that read a tied weight at the end (`sum_stages`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from runtime.interface import Const
from runtime.microbatch import tree_leaves

__all__ = [
    "accumulate",
    "copied",
    "detached",
    "grad_of",
    "output_grads",
    "own",
    "paired",
    "stage_parameters",
    "sum_grads",
    "sum_stages",
    "wants_grad",
]


def wants_grad(leaf: Any) -> bool:
    """Whether ``leaf`` is a tensor autograd differentiates."""
    return isinstance(leaf, torch.Tensor) and leaf.requires_grad


def detached(value: Any) -> Any:
    """``value`` with each tensor that requires grad replaced by a detached leaf that does."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_() if value.requires_grad else value
    if not any(wants_grad(leaf) for leaf in tree_leaves(value)):
        return value
    return pytree.tree_map(detached, value)


def copied(value: Any) -> Any:
    """``value`` with each tensor that requires grad cloned (differentiably)."""
    return pytree.tree_map(lambda t: t.clone() if wants_grad(t) else t, value)


def stage_parameters(stage: torch.nn.Module) -> list[torch.Tensor]:
    """The distinct parameters of ``stage`` that require grad, in module order."""
    seen: set[int] = set()
    params: list[torch.Tensor] = []
    for p in stage.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def accumulate(sums: dict[int, torch.Tensor], owned: set[int], key: int, g: torch.Tensor) -> None:
    """Add ``g`` to ``sums[key]``, in place once the sum is a tensor of our own.

    Stage j's tasks run one at a time in its worker, so the sum over micro-batches can
    grow in place rather than allocate (and page-fault) a parameter-sized tensor per
    micro-batch. But the tensors ``autograd.grad`` returns are not ours to write: with
    one-row micro-batches a broadcast parameter's gradient is the very tensor of its
    consumer's gradient (``h + pos``, ``cls.expand(1, ...)``), or a view of it through
    ``cat``, so it is shared with another parameter's gradient, with the input gradient
    the previous stage is reading at that moment, or with the caller's output gradient.
    So the first micro-batch's gradient is kept as it is, never written, and the second
    makes a fresh sum (``have + g``) that later micro-batches add to in place.
    """
    have = sums.get(key)
    if have is None:
        sums[key] = g
    elif key in owned:
        have.add_(g)
    else:
        sums[key] = have + g
        owned.add(key)


def sum_stages(
    stage_grads: Sequence[dict[int, torch.Tensor]],
    stage_params: Sequence[Sequence[torch.Tensor]],
    owned: Sequence[set[int]] = (),
) -> tuple[dict[int, torch.Tensor], set[int]]:
    """Each parameter's gradient: its stage's sum, or the stages' sum (a tied weight), on
    the parameter's device; and the keys whose tensor is ours (see `accumulate`)."""
    total: dict[int, torch.Tensor] = {}
    mine: set[int] = set()
    where = {id(p): p for group in stage_params for p in group}
    for j, sums in enumerate(stage_grads):
        for key, g in sums.items():
            device = where[key].device
            moved = g if g.device == device else g.to(device)
            if key in total:
                total[key] = total[key] + moved
                mine.add(key)
            else:
                total[key] = moved
                if moved is not g or (j < len(owned) and key in owned[j]):
                    mine.add(key)
    return total, mine


def own(g: torch.Tensor, mine: bool) -> torch.Tensor:
    """``g`` as a tensor nobody else holds: a clone unless it is ``mine`` already."""
    return g if mine else g.clone()


def sum_grads(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The sum of the gradients that are there (None if none is)."""
    total: torch.Tensor | None = None
    for g in parts:
        if g is not None:
            total = g if total is None else total + g
    return total


def output_grads(
    value: torch.Tensor, ends: Sequence[Any], spec: Sequence[str | Const]
) -> list[tuple[str, list[torch.Tensor | None]]]:
    """d value / d each output leaf, as (value name, per tensor leaf) for the named ones."""
    flat = [
        (k, idx, t)
        for k, (end, leaf) in enumerate(zip(ends, spec, strict=True))
        if isinstance(leaf, str)
        for idx, t in enumerate(tree_leaves(end))
        if wants_grad(t)
    ]
    if not flat or not value.requires_grad:
        return []
    found = torch.autograd.grad(value, [t for *_, t in flat], allow_unused=True)
    per: dict[int, list[torch.Tensor | None]] = {}
    for (k, idx, _), g in zip(flat, found, strict=True):
        if g is not None:
            per.setdefault(k, [None] * len(tree_leaves(ends[k])))[idx] = g
    return [(str(spec[k]), grads) for k, grads in per.items()]


def paired(
    outputs: Sequence[Any], parts: Sequence[Sequence[list[torch.Tensor | None]]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The output leaves that got a gradient, and their gradient summed over readers, on
    the leaf's device."""
    tensors: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for value, got in zip(outputs, parts, strict=True):
        if not got:
            continue
        for idx, leaf in enumerate(tree_leaves(value)):
            g = sum_grads([c[idx] for c in got])
            if g is not None and wants_grad(leaf):
                tensors.append(leaf)
                grads.append(g if g.device == leaf.device else g.to(leaf.device))
    return tensors, grads


def grad_of(
    tensors: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    retain: bool,
) -> list[torch.Tensor | None]:
    """``autograd.grad`` of ``tensors`` (with ``grads``) for ``targets``; None for a target
    nothing reaches, and for all of them when there is nothing to differentiate."""
    if not tensors or not targets:
        return [None] * len(targets)
    found = torch.autograd.grad(tensors, targets, grads, retain_graph=retain, allow_unused=True)
    return list(found)
