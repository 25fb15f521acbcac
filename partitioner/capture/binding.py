"""How a traced module's inputs and outputs map onto the user's call.

`trace` attaches a `runtime.interface.Program` to every module it returns, in
``gm.meta["modelsplit_program"]``: ``bind`` maps a new call ``(args, kwargs)``
(any batch size) onto the graph's placeholders, and ``unflatten`` rebuilds the
user-facing output (tensor, tuple, list, dict, Hugging Face ``ModelOutput``)
from the values of the output leaves. Binders and unflatteners are small frozen
dataclasses rather than closures, so they copy, pickle and print.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx._pytree import tree_flatten_spec
from torch.fx.immutable_collections import immutable_dict, immutable_list

from runtime.interface import Const, Program, write_back

__all__ = [
    "PROGRAM_KEY",
    "SIGNATURE_KEY",
    "ExportBinder",
    "FxBinder",
    "Unflatten",
    "input_signature",
    "output_program",
    "program_of",
    "run_program",
]

PROGRAM_KEY = "modelsplit_program"
SIGNATURE_KEY = "modelsplit_signature"

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def program_of(gm: fx.GraphModule) -> Program:
    """The `Program` that `trace` attached to ``gm``, or a TypeError saying how to get one."""
    meta = getattr(gm, "meta", None)
    program = meta.get(PROGRAM_KEY) if isinstance(meta, dict) else None
    if not isinstance(program, Program):
        raise TypeError(
            f"{type(gm).__name__} carries no modelsplit program: build it with "
            f"partitioner.trace(model, example_inputs), which sets gm.meta[{PROGRAM_KEY!r}]"
        )
    return program


def input_signature(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> list[Any]:
    """A JSON-able description of a call: shape and dtype per tensor, repr per constant.

    Two calls with equal signatures trace to the same graph, so a plan made for
    one applies to the other. Keyword arguments are sorted by name.
    """
    kwargs = dict(sorted((kwargs or {}).items()))
    leaves, _ = pytree.tree_flatten_with_path((tuple(args), kwargs))
    out: list[Any] = []
    for path, leaf in leaves:
        where = ("args" if path[0] == pytree.SequenceKey(0) else "kwargs") + pytree.keystr(
            path[1:]
        )
        if isinstance(leaf, torch.Tensor):
            dtype = str(leaf.dtype).removeprefix("torch.")
            out.append({"path": where, "shape": list(leaf.shape), "dtype": dtype})
        else:
            out.append({"path": where, "value": repr(leaf)})
    return out


def describe_call(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> str:
    """A call for people: ``(8, 64) float32, mask=(8,) bool`` (constants as their repr)."""
    return describe_signature(input_signature(args, kwargs))


def describe_signature(signature: Sequence[Mapping[str, Any]]) -> str:
    """An `input_signature` for people, as `describe_call` writes it."""
    parts = []
    for leaf in signature:
        path = str(leaf["path"])
        if re.fullmatch(r"args\[\d+\]", path):
            where = ""  # a plain positional argument
        elif path.startswith("kwargs"):
            where = re.sub(r"^kwargs\['([^']*)'\]", r"\1", path) + "="
        else:
            where = path + "="
        if "shape" in leaf:
            dims = ", ".join(map(str, leaf["shape"])) + ("," if len(leaf["shape"]) == 1 else "")
            parts.append(f"{where}({dims}) {leaf['dtype']}")
        else:
            parts.append(f"{where}{leaf['value']}")
    return ", ".join(parts) or "(no inputs)"


def _check_constant(name: str, value: Any, traced: Any) -> None:
    try:
        same = bool(value == traced) and type(value) is type(traced)
    except Exception:  # values that do not compare (arrays...): trust the caller
        return
    if not same:
        raise ValueError(
            f"argument {name}={value!r} differs from the value the model was traced with "
            f"({traced!r}); the graph specialised on it: trace again with the new value"
        )


@dataclass(frozen=True)
class FxBinder:
    """Binds a call for a `symbolic_trace` graph: tensors by argument name, constants checked."""

    signature: inspect.Signature
    placeholders: tuple[tuple[str, str], ...]  # (argument name, placeholder name)
    constants: tuple[tuple[str, Any], ...]  # (argument name, traced value)

    def __call__(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        for name, traced in self.constants:
            _check_constant(name, bound.arguments.get(name), traced)
        return {ph: bound.arguments[arg] for arg, ph in self.placeholders}


@dataclass(frozen=True)
class ExportBinder:
    """Binds a call for a `torch.export` graph: flattened with the export's input spec.

    The call is first normalised to the shape the export saw (the same number of
    positional arguments, the same keywords) through the forward's signature, so
    ``m(x, mask)`` binds like ``m(x, mask=mask)``.
    """

    signature: inspect.Signature | None
    in_spec: pytree.TreeSpec
    placeholders: tuple[str, ...]
    constants: tuple[tuple[int, Any], ...]  # (flat index, traced value) of non-tensor leaves

    def __call__(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        args, kwargs = self._normalise(tuple(args), dict(kwargs))
        flat = tree_flatten_spec((args, kwargs), self.in_spec)
        if len(flat) != len(self.placeholders):
            raise ValueError(
                f"the call flattens to {len(flat)} inputs, the graph takes "
                f"{len(self.placeholders)}"
            )
        for i, traced in self.constants:
            _check_constant(self.placeholders[i], flat[i], traced)
        return dict(zip(self.placeholders, flat, strict=True))

    def _normalise(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args_spec, kwargs_spec = _children(self.in_spec)
        n_pos = args_spec.num_children
        keys = list(kwargs_spec.context or [])
        if self.signature is None or (len(args) == n_pos and sorted(kwargs) == sorted(keys)):
            return args, kwargs
        params = self.signature.parameters.values()
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        named: dict[str, Any] = {}  # every argument by name, **kwargs spread out
        positional: list[Any] = []
        for p in params:
            value = bound.arguments.get(p.name)
            if p.kind in _POSITIONAL:
                positional.append(value)
                named[p.name] = value
            elif p.kind is inspect.Parameter.VAR_POSITIONAL:
                positional.extend(value or ())
            elif p.kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value or {})
            else:
                named[p.name] = value
        pos_names = [p.name for p in params if p.kind in _POSITIONAL]
        covered = set(pos_names[:n_pos]) | set(keys)
        defaults = {p.name: p.default for p in params}
        extra = sorted(
            name
            for name, value in named.items()
            if name not in covered and value is not None and value is not defaults.get(name)
        )
        if extra:
            raise ValueError(
                f"argument(s) {extra} were not given when the model was traced; "
                f"trace again with them in the example inputs"
            )
        new_kwargs = {k: named.get(k) for k in keys}
        return tuple(positional[:n_pos]), new_kwargs


def _children(spec: pytree.TreeSpec) -> list[pytree.TreeSpec]:
    children = getattr(spec, "children", None)  # torch >= 2.10; children_specs before
    return list(children()) if callable(children) else list(spec.children_specs)


@dataclass(frozen=True)
class Unflatten:
    """Rebuilds the user's output from its leaves (a `Const` stands for itself)."""

    spec: pytree.TreeSpec

    def __call__(self, leaves: list[Any]) -> Any:
        values = [leaf.value if isinstance(leaf, Const) else leaf for leaf in leaves]
        # leaves past the output's own hold written inputs: [Note: writes to model inputs]
        return pytree.tree_unflatten(values[: self.spec.num_leaves], self.spec)


def _thaw(arg: Any) -> Any:
    """fx stores output structures as immutable collections; the user gets plain ones."""
    if isinstance(arg, immutable_list | list):
        return [_thaw(a) for a in arg]
    if isinstance(arg, immutable_dict | dict):
        return {k: _thaw(v) for k, v in arg.items()}
    if isinstance(arg, tuple):
        items = [_thaw(a) for a in arg]
        return type(arg)(*items) if hasattr(arg, "_fields") else tuple(items)
    return arg


def output_program(
    gm: fx.GraphModule, spec: pytree.TreeSpec | None = None
) -> tuple[tuple[str | Const, ...], Unflatten]:
    """Output leaves (node names or `Const`) and the unflattener of ``gm``'s output node.

    With ``spec`` (an export's output spec) the output node holds the flat
    leaves; without it the output node holds the structure itself (fx).
    """
    (output,) = (n for n in gm.graph.nodes if n.op == "output")
    if spec is None:
        leaves, spec = pytree.tree_flatten(_thaw(output.args[0]))
    else:
        leaves = list(output.args[0])
    names = tuple(leaf.name if isinstance(leaf, fx.Node) else Const(leaf) for leaf in leaves)
    return names, Unflatten(spec)


class _Keep(fx.Interpreter):
    """Runs the graph node by node and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, keep: set[str]) -> None:
        super().__init__(gm)
        self.keep = keep
        self.kept: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.keep:
            self.kept[n.name] = value
        return value


def run_program(gm: fx.GraphModule, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """Call ``gm`` the way split stages will: bind, run node by node, unflatten."""
    program = program_of(gm)
    values = program.bind(args, kwargs)
    names = {leaf for leaf in program.output_leaves if isinstance(leaf, str)}
    interp = _Keep(gm, names)
    interp.run(*(values[name] for name in program.inputs), enable_io_processing=False)
    leaves = [
        leaf.value if isinstance(leaf, Const) else interp.kept[leaf]
        for leaf in program.output_leaves
    ]
    write_back(program.writes, program.output_leaves, values, leaves)
    return program.unflatten(leaves)
