"""Which ops of an fx graph mutate a tensor in place, and which share memory (trace and runtime).

`partitioner.capture.inplace` turns such mutations into data flow after tracing; the pipelined
backward (`runtime.backward`) gives a stage a private copy of an input it mutates, since
the input it receives is a leaf of the task's own graph and autograd forbids changing a
leaf in place. Both graph levels count: fx's (``x.relu_()``, ``operator.iadd``, modules with
``inplace=True``) and torch.export's aten ops, whose schemas say what they write
(``aten.relu_.default`` writes ``self``) and what they return a view of.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = [
    "alias_source",
    "is_exact_view",
    "mutated_arg",
    "mutated_inputs",
    "mutated_slot",
    "reads_metadata",
]

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

# fx methods (and torch functions of the same names) whose result may share memory with
# their first argument.
VIEW_METHODS = frozenset(
    {
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
        "dropout",
        "alpha_dropout",
        "feature_alpha_dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
    }
)
# Tensor attributes that alias the tensor (``x.shape`` or ``x.dtype`` do not).
_VIEW_ATTRIBUTES = {"T", "mT", "H", "mH", "real", "imag", "data"}
# Modules that may return their input itself: nn.Identity always, dropout when not training.
_ALIAS_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd)
# Ops that read only a tensor's shape, strides, dtype or device, never its values.
_METADATA_METHODS = {"size", "dim", "stride", "numel", "nelement", "element_size", "is_contiguous"}
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}


def _schema(node: fx.Node) -> Any:
    target = node.target
    if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
        return target._schema
    return None


def mutated_slot(node: fx.Node, root: torch.nn.Module) -> int | str | None:
    """Where ``node``'s argument that it mutates in place sits: a position in ``node.args``,
    a keyword of ``node.kwargs``, or None when it mutates nothing."""
    schema = _schema(node)
    if schema is not None:  # an aten op (torch.export): its schema marks what it writes
        for k, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            slot: int | str = k if not arg.kwarg_only and k < len(node.args) else arg.name
            value = node.args[slot] if isinstance(slot, int) else node.kwargs.get(slot)
            if isinstance(value, fx.Node):
                return slot
        return None
    if node.op in ("call_function", "call_method") and isinstance(node.kwargs.get("out"), fx.Node):
        return "out"  # torch.add(a, b, out=c) writes c
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    target = node.target
    if node.op == "call_method":
        name = str(target)
        if name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATING:
            return 0
    elif node.op == "call_function":
        if target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return 0
        if target is operator.setitem:  # x[index] = value
            return 0
        name = getattr(target, "__name__", "")
        module = getattr(target, "__module__", "") or ""
        if name.endswith("_") and not name.startswith("_") and module.startswith("torch"):
            return 0
    elif (
        node.op == "call_module"
        and getattr(root.get_submodule(str(target)), "inplace", False) is True
    ):
        return 0
    return None


def mutated_arg(node: fx.Node, root: torch.nn.Module) -> fx.Node | None:
    """The node whose tensor ``node`` mutates in place, or None."""
    slot = mutated_slot(node, root)
    if slot is None:
        return None
    value = node.args[slot] if isinstance(slot, int) else node.kwargs[slot]
    assert isinstance(value, fx.Node)
    return value


def alias_source(node: fx.Node, root: torch.nn.Module) -> fx.Node | None:
    """The node whose memory ``node``'s result may share without writing it (a view, an
    ``nn.Identity``, an aten op whose schema returns an alias), or None. Conservative:
    ``x.reshape(...)`` and ``x.to(dtype)`` count, since they may return views."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    schema = _schema(node)
    if schema is not None:
        returns = schema.returns
        shares = bool(returns) and returns[0].alias_info is not None
        return first if shares and not schema.is_mutable else None
    if node.op == "call_method":
        return first if str(node.target) in VIEW_METHODS else None
    if node.op == "call_module":
        return first if isinstance(root.get_submodule(str(node.target)), _ALIAS_MODULES) else None
    if node.op != "call_function":
        return None
    if node.target is getattr:
        return first if len(node.args) > 1 and node.args[1] in _VIEW_ATTRIBUTES else None
    if node.target is operator.getitem:
        # indexing a tensor may give a view, an item of a list of views is one; an item of
        # an aten op's fresh outputs (native_batch_norm's) is not
        return None if _returns_fresh(first) else first
    return first if getattr(node.target, "__name__", "") in VIEW_METHODS else None


def _returns_fresh(node: fx.Node) -> bool:
    """An aten op whose outputs share no memory with its inputs (``native_batch_norm``)."""
    schema = _schema(node)
    return schema is not None and all(r.alias_info is None for r in schema.returns)


def is_exact_view(node: fx.Node) -> bool:
    """Whether ``node`` is an aten view that always shares its source's memory (``slice``,
    ``select``, ``view``, ``transpose``, an item of ``split``), as opposed to one that may
    copy (``reshape``, ``contiguous``, ``to``: composite ops) or an fx-level op."""
    if node.op == "call_function" and node.target is operator.getitem:
        first = node.args[0]
        return isinstance(first, fx.Node) and is_exact_view(first)
    schema = _schema(node)
    if schema is None or schema.is_mutable or not schema.returns:
        return False
    if schema.returns[0].alias_info is None:
        return False
    name = node.target.name()  # type: ignore[union-attr]
    return not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")


def reads_metadata(node: fx.Node) -> bool:
    """Whether ``node`` reads only its inputs' metadata (sizes, dtype), not their values."""
    if node.op == "call_method":
        return str(node.target) in _METADATA_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES
    schema = _schema(node)
    if schema is None:
        return False
    name = schema.name
    return name.startswith("aten::sym_") or name == "aten::_assert_tensor_metadata"


def mutated_inputs(stage: torch.nn.Module) -> frozenset[int]:
    """Positions of the placeholders a GraphModule stage mutates in place, directly or
    through a tensor that may share their memory (none for other modules, which cannot be
    inspected)."""
    if not isinstance(stage, fx.GraphModule):
        return frozenset()
    position = {n: k for k, n in enumerate(n for n in stage.graph.nodes if n.op == "placeholder")}
    # owner[n]: the placeholders whose memory node n may share (views, in-place results)
    owner: dict[fx.Node, frozenset[int]] = {n: frozenset({k}) for n, k in position.items()}
    found: set[int] = set()
    for node in stage.graph.nodes:
        target = mutated_arg(node, stage)
        source = target if target is not None else alias_source(node, stage)
        if source is None or source not in owner:
            continue
        owner[node] = owner[source]
        if target is not None:
            found |= owner[target]
    return frozenset(found)
