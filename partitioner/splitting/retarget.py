"""Place stages on their devices: move weights, retarget a graph's burnt-in devices.

`torch.export` records the trace device in the graph: factory calls carry
``device=cpu`` (``aten.arange``, ``aten.full``...), casts carry it
(``aten.to.dtype_layout``) and ``aten._assert_tensor_metadata`` checks it. A stage
moved to ``cuda:1`` would still make its position ids on the CPU. `retarget`
rewrites those arguments, as `torch.export.passes.move_to_device_pass` does for an
ExportedProgram, but for one stage GraphModule and without touching its weights
(`place` moves the weights and calls it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from partitioner.devices import torch_device
from runtime.replica import tied_replica

__all__ = ["place", "read_through_copy", "retarget"]

log = logging.getLogger(__name__)

DeviceLike = torch.device | str


def retarget(stage: torch.fx.GraphModule, device: DeviceLike) -> torch.fx.GraphModule:
    """Rewrite every device argument in ``stage``'s graph to ``device``; returns ``stage``.

    Nested graph modules a ``get_attr`` reaches (higher-order op bodies such as
    ``wrap_with_set_grad_enabled``) are replaced by retargeted copies, so the
    traced module they came from keeps its own. Node ``meta["val"]`` is left as
    traced.
    """
    target = torch.device(device)
    changed = _retarget_graph(stage.graph, target)
    for node in stage.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, name = str(node.target).rpartition(".")
        parent = stage.get_submodule(owner)
        sub = getattr(parent, name)
        if isinstance(sub, torch.fx.GraphModule):
            copied = torch.fx.GraphModule(sub, _copy_graph(sub.graph), sub.__class__.__name__)
            retarget(copied, target)
            setattr(parent, name, copied)
    if changed:
        stage.recompile()
    log.debug(
        "retargeted %s device argument(s) of %s to %s", changed, type(stage).__name__, target
    )
    return stage


def _retarget_graph(graph: torch.fx.Graph, device: torch.device) -> int:
    changed = 0
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if isinstance(node.kwargs.get("device"), torch.device | str):
            node.kwargs = {**node.kwargs, "device": device}
            changed += 1
        args = list(node.args)
        hits = [i for i, a in enumerate(args) if isinstance(a, torch.device)]
        for i in hits:
            args[i] = device
        if hits:
            node.args = tuple(args)
            changed += len(hits)
    return changed


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    copied = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    result = copied.graph_copy(graph, env)
    copied.output(result)
    copied._codegen = graph._codegen
    return copied


def read_through_copy(
    stage: torch.fx.GraphModule, names: set[str], device: DeviceLike
) -> torch.fx.GraphModule:
    """Make ``stage`` read the weights ``names`` through a copy on ``device``.

    [Note: tied weights across devices]
    A weight shared by stages on two devices (GPT-2's embedding and LM head) stays on the
    device of the first stage that reads it. A later stage on another device reads it as
    ``tied_replica(weight, device)``, inserted after its ``get_attr``: a replica made once
    per call on that stage's stream and shared by the call's micro-batches, whose summed
    gradient autograd sends back once per call, so the one Parameter gets the sum of all
    uses' gradients, as in the unsplit model, and an optimizer step updates the only copy
    there is ([Note: tied-weight replicas] in `runtime.replica`). A weight a ``call_module``
    node owns (an fx-traced ``nn.Linear`` whose weight is tied) cannot be rewritten this way.
    """
    target = torch.device(device)
    for node in stage.graph.nodes:
        if node.op == "call_module":
            owned = {
                f"{node.target}.{n}"
                for n, _ in stage.get_submodule(node.target).named_parameters()
            }
            shared = owned & names
            if shared:
                raise NotImplementedError(
                    f"weight {sorted(shared)[0]!r} is tied across devices inside module "
                    f"{node.target!r}; trace with mode='export' (ties become get_attr reads "
                    f"that can be copied) or put both stages on one device"
                )
    copies = 0
    for node in list(stage.graph.nodes):
        if node.op != "get_attr" or node.target not in names:
            continue
        with stage.graph.inserting_after(node):
            copy = stage.graph.call_function(tied_replica, (node, target))
        node.replace_all_uses_with(copy, delete_user_cb=lambda user, c=copy: user is not c)
        copies += 1
    if copies:
        stage.recompile()
    log.debug(
        "%s reads %s tied weight(s) through a copy to %s", type(stage).__name__, copies, target
    )
    return stage


def place(stages: Sequence[nn.Module], devices: Sequence[str]) -> None:
    """Move each stage's weights to its device in place (no second copy is kept).

    Moving ``.data`` keeps every Parameter object, so the model, the splitter and
    an optimizer built before placement all see the placed weights.
    """
    owner: dict[int, int] = {}
    for j, (stage, name) in enumerate(zip(stages, devices, strict=True)):
        dev = torch_device(name)
        tied: set[str] = set()
        named: list[tuple[str, torch.Tensor]] = list(
            stage.named_parameters(remove_duplicate=False)
        )
        named += list(stage.named_buffers(remove_duplicate=False))
        for qualname, tensor in named:
            first = owner.setdefault(id(tensor), j)
            if first != j and torch_device(devices[first]) != dev:
                tied.add(qualname)  # stays with stage `first`; read through a copy here
            elif tensor.device != dev:
                tensor.data = tensor.data.to(dev)
        if tied:
            if not isinstance(stage, torch.fx.GraphModule):
                raise NotImplementedError(
                    f"stage {j} shares weights {sorted(tied)} with a stage on another "
                    f"device; put both stages on one device or untie them"
                )
            read_through_copy(stage, tied, dev)  # [Note: tied weights across devices]
        if dev.type != "cpu" and isinstance(stage, torch.fx.GraphModule):
            retarget(stage, dev)  # torch.export burns the trace device into factory calls
