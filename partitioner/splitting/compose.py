"""Composing split stages: sequential reference execution, shared tensors, a summary.

`share_tensors` makes a traced module hold the model's own weights before it is split.

These read only the stage interface ([Note: stage interface] in
runtime/interface.py), so they work on any list of stages `split` returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from partitioner.capture.names import RENAMED_KEY, model_name
from runtime.interface import Const, stage_io, write_back

__all__ = [
    "SharedTensor",
    "run_stages",
    "share_tensors",
    "shared_tensors",
    "stage_summary",
]


def run_stages(stages: Sequence[torch.nn.Module], *args: Any, **kwargs: Any) -> Any:
    """Run ``stages`` one after another on one thread; the model's output, as it returns it.

    The reference the runtimes are checked against: the call is bound to named
    model inputs by the stages' Program, each stage reads its inputs by name from
    one environment and adds its outputs to it, and the output leaves are put
    back into the model's output structure (tensor, tuple, dict, ModelOutput).
    """
    if not stages:
        raise ValueError("run_stages needs at least one stage (got none)")
    program = stage_io(stages[0]).program
    env = program.bind(args, kwargs)
    given = dict(env)  # the caller's own tensors: [Note: writes to model inputs]
    for stage in stages:
        io = stage_io(stage)
        values = stage(*(env[name] for name in io.inputs))
        if not isinstance(values, tuple) or len(values) != len(io.outputs):
            raise TypeError(
                f"stage {io.stage} must return a tuple of {len(io.outputs)} value(s) "
                f"{list(io.outputs)}, returned {type(values).__name__}"
            )
        env.update(zip(io.outputs, values, strict=True))
    leaves = [
        leaf.value if isinstance(leaf, Const) else env[leaf] for leaf in program.output_leaves
    ]
    write_back(program.writes, program.output_leaves, given, leaves)
    return program.unflatten(leaves)


@dataclass(frozen=True)
class SharedTensor:
    """A parameter or buffer held by several stages (a tied weight, a reused module).

    ``names[k]`` is its qualified name in stage ``stages[k]``; every stage holds
    the same tensor object.
    """

    stages: tuple[int, ...]
    names: tuple[str, ...]
    is_parameter: bool
    numel: int


def shared_tensors(stages: Sequence[torch.nn.Module]) -> list[SharedTensor]:
    """The parameters and buffers that more than one stage holds, in first-seen order.

    On one device sharing is exact. Across devices each extra holder needs its
    own copy, whose gradient must be added into the owner's (see README, "Tied
    weights").
    """
    seen: dict[int, list[tuple[int, str, torch.Tensor]]] = {}
    for j, stage in enumerate(stages):
        named = [*stage.named_parameters(), *stage.named_buffers()]
        for name, tensor in named:
            holders = seen.setdefault(id(tensor), [])
            if not holders or holders[-1][0] != j:
                holders.append((j, name, tensor))
    return [
        SharedTensor(
            stages=tuple(j for j, _, _ in holders),
            names=tuple(name for _, name, _ in holders),
            is_parameter=isinstance(holders[0][2], torch.nn.Parameter),
            numel=holders[0][2].numel(),
        )
        for holders in seen.values()
        if len(holders) > 1
    ]


def stage_summary(stages: Sequence[torch.nn.Module]) -> str:
    """A few lines per stage: node count, parameters, and the values in and out."""
    lines = []
    for stage in stages:
        io = stage_io(stage)
        graph = getattr(stage, "graph", None)
        nodes = graph.nodes if isinstance(graph, torch.fx.Graph) else ()
        count = sum(n.op not in ("placeholder", "output") for n in nodes)
        params = sum(p.numel() for p in stage.parameters())
        lines.append(f"stage {io.stage}: {count} nodes, {params:,} parameters")
        lines.append(f"  in : {', '.join(io.inputs) or '-'}")
        lines.append(f"  out: {', '.join(io.outputs) or '-'}")
    return "\n".join(lines)


def share_tensors(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """Make the traced module hold the model's own Parameter and buffer objects.

    torch.export may hand back new tensor objects; sharing the originals means an
    optimizer on the model (or on the splitter) trains the stages, and placing a
    weight on its device moves it rather than copying it.
    """
    own: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    renamed = gm.meta.get(RENAMED_KEY, {})  # [Note: clashing names]
    for name, tensor in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        original = own.get(model_name(renamed, name))
        if original is None or original is tensor:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if attr in owner._parameters:
            owner._parameters[attr] = original  # type: ignore[assignment]
        elif attr in owner._buffers:
            owner._buffers[attr] = original
