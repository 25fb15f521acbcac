"""Which ops of an fx graph mutate a tensor in place (shared by trace and runtime).

`partitioner.capture.inplace` turns such mutations into data flow after fx tracing; the pipelined
backward (`runtime.backward`) gives a stage a private copy of an input it mutates, since
the input it receives is a leaf of the task's own graph and autograd forbids changing a
leaf in place.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

__all__ = ["mutated_arg", "mutated_inputs"]

_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
}
# Trailing-underscore methods that do not change the tensor's values.
_NOT_MUTATING = {"requires_grad_", "share_memory_", "retain_grad_", "pin_memory_"}


def mutated_arg(node: fx.Node, root: torch.nn.Module) -> fx.Node | None:
    """The node whose tensor ``node`` mutates in place, or None."""
    target = node.target
    out = node.kwargs.get("out")
    if node.op in ("call_function", "call_method") and isinstance(out, fx.Node):
        return out  # torch.add(a, b, out=c) writes c
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_method":
        name = str(target)
        if name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATING:
            return first
    elif node.op == "call_function":
        if target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return first
        if target is operator.setitem:  # x[index] = value
            return first
        name = getattr(target, "__name__", "")
        module = getattr(target, "__module__", "") or ""
        if name.endswith("_") and not name.startswith("_") and module.startswith("torch"):
            return first
    elif (
        node.op == "call_module" and getattr(root.get_submodule(str(target)), "inplace", 0) is True
    ):
        return first
    return None


def mutated_inputs(stage: torch.nn.Module) -> frozenset[int]:
    """Positions of the placeholders a GraphModule stage mutates in place (none for
    other modules, which cannot be inspected)."""
    if not isinstance(stage, fx.GraphModule):
        return frozenset()
    position = {n: k for k, n in enumerate(n for n in stage.graph.nodes if n.op == "placeholder")}
    found = set()
    for node in stage.graph.nodes:
        target = mutated_arg(node, stage)
        if target is not None and target in position:
            found.add(position[target])
    return frozenset(found)
