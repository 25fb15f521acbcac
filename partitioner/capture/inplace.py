"""Make the in-place ops of an fx graph explicit data flow, so a split keeps eager semantics.

[Note: in-place ops]
fx records ``y.relu_()`` as a node whose result nobody reads, while later nodes keep
reading ``y``: the order "mutate, then read" lives only in the node order. The planner and
`split` see data edges only, so they may run a later reader before the mutation, or in a
stage that got ``y`` before it was mutated (and across devices the mutation happens on a
copy): silently wrong output. So after fx tracing, for each in-place node m that mutates
its first argument t:

- the nodes after m that read t read m instead (an in-place op returns the tensor it
  mutated), which makes the order a data edge;
- when nodes before m also read t, m gets a clone of t to mutate, so those readers keep the
  value they saw in eager mode wherever the planner puts them.

A mutation that other tensors can observe cannot be rewritten this way: t a view (getitem,
view, transpose, ...), t with views taken of it, or t a model input, parameter or buffer
(``self.steps += 1``). Those raise TypeError, so ``mode="auto"`` falls back to
torch.export, which functionalizes the graph itself, and ``mode="fx"`` names the op.
In-place ops are ``x.op_()`` methods, ``torch.op_`` functions, ``x += y`` and friends,
``inplace=True`` keyword arguments, and modules with ``inplace=True`` (``nn.ReLU``).
Assignment into a tensor (``x[mask] = 0``) returns nothing to read instead, so it also
sends ``mode="auto"`` to export.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from runtime.mutation import mutated_arg

__all__ = ["functionalize_inplace"]

# Ops whose result may share memory with their first argument.
_VIEW_METHODS = {
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "transpose",
    "permute",
    "t",
    "narrow",
    "select",
    "expand",
    "expand_as",
    "squeeze",
    "unsqueeze",
    "flatten",
    "unflatten",
    "as_strided",
    "unfold",
    "split",
    "chunk",
    "unbind",
    "diagonal",
    "movedim",
    "moveaxis",
    "swapaxes",
    "swapdims",
    "detach",
    "contiguous",
    "real",
    "imag",
    "to",
    "type_as",
    "float",
    "half",
    "double",
    "int",
    "long",
    "bool",
    "cpu",
    "cuda",
    "data",
}
_VIEW_FUNCTIONS = {operator.getitem}
# Tensor attributes that alias the tensor (``x.shape`` or ``x.dtype`` do not).
_VIEW_ATTRIBUTES = {"T", "mT", "H", "mH", "real", "imag", "data"}


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _VIEW_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _VIEW_ATTRIBUTES
        name = getattr(node.target, "__name__", "")
        return node.target in _VIEW_FUNCTIONS or name in _VIEW_METHODS
    return False


def _describe(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_module":
        return f"module {node.target!r} (inplace=True)"
    return getattr(node.target, "__name__", str(node.target))


def functionalize_inplace(gm: fx.GraphModule) -> int:
    """Rewrite ``gm``'s in-place ops as data flow ([Note: in-place ops]); return how many.

    Raises TypeError for a mutation other tensors could observe.
    """
    graph = gm.graph
    rewritten = 0
    for m in list(graph.nodes):
        t = mutated_arg(m, gm)
        if t is None:
            continue
        what = f"in-place {_describe(m)} (node {m.name!r}) mutates {t.name!r}"
        if isinstance(m.kwargs.get("out"), fx.Node):
            raise TypeError(
                f"{what} through out=, so nothing returns the result for later nodes to read "
                f"instead; trace with mode='export'"
            )
        if m.target is operator.setitem:
            raise TypeError(
                f"{what} by assignment (x[...] = value), which returns nothing later nodes "
                f"could read instead; trace with mode='export'"
            )
        if t.op in ("placeholder", "get_attr"):
            raise TypeError(
                f"{what}, a model input, parameter or buffer: the mutation must persist, "
                f"which fx graphs cannot split; trace with mode='export'"
            )
        if _is_view(t) or any(_is_view(u) for u in t.users):
            raise TypeError(
                f"{what}, which shares memory with other tensors (a view): the split could "
                f"reorder who sees the change; trace with mode='export'"
            )
        position = {n: k for k, n in enumerate(graph.nodes)}
        others = [u for u in t.users if u is not m]
        before = [u for u in others if position[u] < position[m]]
        after = [u for u in others if position[u] > position[m]]
        if not before and not after:
            continue
        for user in after:
            user.replace_input_with(t, m)
        if before:
            with graph.inserting_before(m):
                clone = graph.call_method("clone", (t,))
            m.replace_input_with(t, clone)
            # replace_input_with rewrote every argument equal to t; m mutates only the first.
            _restore_later_args(m, t, clone)
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten


def _restore_later_args(m: fx.Node, t: fx.Node, clone: fx.Node) -> None:
    """``m``'s first argument is the clone; any later argument that was t stays t."""
    args: list[Any] = list(m.args)
    args[1:] = [t if a is clone else a for a in args[1:]]
    m.args = tuple(args)
    m.kwargs = {k: (t if v is clone else v) for k, v in m.kwargs.items()}
