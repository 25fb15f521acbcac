"""Make the in-place ops of a traced graph explicit data flow, so a split keeps eager semantics.

[Note: in-place ops]
fx records ``y.relu_()`` as a node whose result nobody reads, while later nodes keep
reading ``y``; torch.export graphs keep ``add_``, ``copy_`` and ``relu_`` too (they are not
functionalized), and ``h[:, :4] += 1`` writes ``h`` through ``slice`` nodes nobody reads
afterwards. The order "mutate, then read" lives only in the node order. The planner and
`split` see data edges only, so they may run a later reader before the mutation, or in a
stage that got ``y`` before it was mutated (and across devices the mutation happens on a
copy): silently wrong output. So after tracing (fx and export), for each in-place node m
that writes tensor t, in node order: let b be the tensor t shares memory with (t itself, or
what t is a view of), and the readers be every node other than m that reads the values of
b or of a view of b (nodes that read only sizes or dtypes do not count). With no readers,
nothing can observe the change and m stays as it is; otherwise:

- when readers come before m, m works on a clone of b, so they keep the value they saw in
  eager mode wherever the planner puts them;
- when t is a view of b (export graphs), the views from b to t and m become one node, a
  small GraphModule with ``inplace=True`` that returns b, so the write happens where b is;
- the readers after m read m (an in-place op returns the tensor it mutated), or a view of m
  made again the way the view they read was made, which makes the order a data edge.

So every in-place op is left with a tensor only it reads: whoever reads the change reads it
through the op. `mutation_hazards` lists the in-place ops of a graph that is not so
(a graph `trace` did not make), which `split` keeps on one stage.

Some mutations cannot be rewritten this way and raise TypeError: in fx graphs, a write
other tensors can observe through a view (getitem, view, transpose, ...), and any write to
a model input, parameter or buffer (``self.steps += 1``), so ``mode="auto"`` falls back to
torch.export and ``mode="fx"`` names the op; in export graphs, an observed write through an
op that may or may not return a view (``reshape``, ``contiguous``, ``to``). An ``nn.Identity``
returns its input itself, so it is read through. Writes to parameters and buffers stay as
they are in export graphs (each stage holds the very tensor); writes to a model input go to a
private clone of it, whose last version the caller's tensor gets after the call
(`persist_input_writes`, [Note: writes to model inputs] in `runtime.interface`). In-place ops are
``x.op_()`` methods, ``torch.op_`` functions, ``x += y`` and friends, ``inplace=True``
keyword arguments, modules with ``inplace=True`` (``nn.ReLU``) and aten ops whose schema
writes an argument. Assignment into a tensor (``x[mask] = 0``) returns nothing to read
instead, so in fx it also sends ``mode="auto"`` to export.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from runtime.mutation import (
    alias_source,
    is_exact_view,
    mutated_arg,
    mutated_inputs,
    mutated_slot,
    reads_metadata,
)

__all__ = ["functionalize_inplace", "mutation_hazards", "persist_input_writes"]

_VALUE_META = ("val", "tensor_meta", "example_value")


def _describe(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_module":
        return f"module {node.target!r} (inplace=True)"
    return getattr(node.target, "__name__", str(node.target))


def _view_source(node: fx.Node, root: nn.Module) -> fx.Node | None:
    """What ``node`` is a view of; an in-place op's result is a new version, not a view."""
    if mutated_arg(node, root) is not None:
        return None
    source = alias_source(node, root)
    if source is not None and _converts(node, source) is True:
        return None  # aten.to to another dtype or device: a copy
    return source


def _converts(node: fx.Node, source: fx.Node) -> bool | None:
    """For an export graph's ``aten.to``: whether it changes dtype or device (so it copies)
    or not (it returns its input itself), from the traced values; None when not known."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.name() != "aten::to":
        return None
    if node.kwargs.get("copy") is True or node.kwargs.get("memory_format") is not None:
        return None
    new, old = node.meta.get("val"), source.meta.get("val")
    if not isinstance(new, torch.Tensor) or not isinstance(old, torch.Tensor):
        return None
    return bool(new.dtype != old.dtype or new.device != old.device)


def _exact(node: fx.Node, root: nn.Module) -> bool:
    """A view whose memory is its source's whatever the strides (see `is_exact_view`)."""
    source = alias_source(node, root)
    return is_exact_view(node) or (source is not None and _converts(node, source) is False)


def _chain(t: fx.Node, root: nn.Module) -> tuple[list[fx.Node], fx.Node]:
    """The views from the base tensor to ``t`` (``t`` last; empty when ``t`` is a base)."""
    chain: list[fx.Node] = []
    node = t
    while (source := _view_source(node, root)) is not None:
        chain.append(node)
        node = source
    return chain[::-1], node


def _aliases(base: fx.Node, root: nn.Module) -> list[fx.Node]:
    """``base`` and every view of it, views of views included, in graph order."""
    found = {base: None}
    frontier = [base]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user not in found and _view_source(user, root) is node:
                found[user] = None
                frontier.append(user)
    return list(found)


def _readers(aliases: list[fx.Node], m: fx.Node) -> list[fx.Node]:
    """The nodes other than ``m`` that read the values of one of ``aliases``."""
    members = set(aliases)
    found: dict[fx.Node, None] = {}
    for node in aliases:
        for user in node.users:
            if user not in members and user is not m and not reads_metadata(user):
                found[user] = None
    return list(found)


def mutation_hazards(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node]]]:
    """The in-place ops whose change other nodes observe, each with the nodes involved (the
    views written through and the readers): empty for a graph `functionalize_inplace`
    rewrote. Writes to parameters and buffers are left out."""
    hazards = []
    for m in gm.graph.nodes:
        t = mutated_arg(m, gm)
        if t is None:
            continue
        chain, base = _chain(t, gm)
        if base.op == "get_attr":
            continue
        aliases = _aliases(base, gm)
        readers = _readers(aliases, m)
        if readers:
            hazards.append((m, [n for n in aliases if n is not base] + readers))
    return hazards


def persist_input_writes(gm: fx.GraphModule) -> tuple[tuple[str, str], ...]:
    """Make the writes to model inputs (placeholders) go to a private clone of each, and add
    a clone of that just before the output; run before `functionalize_inplace`, which makes
    the latter read the input's last version: the value the caller's tensor must end with
    ([Note: writes to model inputs] in `runtime.interface`). So no stage writes to a tensor
    it was given (a micro-batch may be a view of the caller's tensor, which autograd may
    have saved), and the caller's tensor is written once, after the call. Returns
    (placeholder name, final clone name) pairs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = sorted(mutated_inputs(gm))
    if not written:
        return ()
    (output,) = (n for n in gm.graph.nodes if n.op == "output")
    pairs = []
    for k in written:
        p = placeholders[k]
        with gm.graph.inserting_after(placeholders[-1]):
            own = gm.graph.call_function(torch.ops.aten.clone.default, (p,))
        p.replace_all_uses_with(own, delete_user_cb=lambda user, own=own: user is not own)
        with gm.graph.inserting_before(output):
            final = gm.graph.create_node(
                "call_function", torch.ops.aten.clone.default, (own,), name=f"{p.name}_written"
            )
        for node in (own, final):
            node.meta = {key: p.meta[key] for key in _VALUE_META if key in p.meta}
        pairs.append((p.name, final.name))
    gm.recompile()
    return tuple(pairs)


def functionalize_inplace(gm: fx.GraphModule) -> int:
    """Rewrite ``gm``'s in-place ops as data flow ([Note: in-place ops]); return how many.

    Raises TypeError for a mutation that cannot be rewritten.
    """
    graph = gm.graph
    rewritten = 0
    for m in list(graph.nodes):
        if m.graph is graph and not getattr(m, "_erased", False):
            t = mutated_arg(m, gm)
            if t is not None and _rewrite(gm, m, t):
                rewritten += 1
    if rewritten:
        graph.eliminate_dead_code(_is_impure_node)
        graph.lint()
        gm.recompile()
    return rewritten


def _is_impure_node(node: fx.Node) -> bool:
    """Dead-code elimination removes only the views the rewrite left unread."""
    return node.op != "call_function" or not is_exact_view(node) or bool(node.users)


def _check_fx_forms(m: fx.Node, t: fx.Node, what: str) -> None:
    if m.op == "call_function" and isinstance(m.target, torch._ops.OpOverload):
        return
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


def _rewrite(gm: fx.GraphModule, m: fx.Node, t: fx.Node) -> bool:
    what = f"in-place {_describe(m)} (node {m.name!r}) mutates {t.name!r}"
    _check_fx_forms(m, t, what)
    aten = m.op == "call_function" and isinstance(m.target, torch._ops.OpOverload)
    chain, base = _chain(t, gm)
    if base.op in ("placeholder", "get_attr"):
        if not aten:
            raise TypeError(
                f"{what}, a model input, parameter or buffer: the mutation must persist, "
                f"which fx graphs cannot split; trace with mode='export'"
            )
        if base.op == "get_attr":
            return False  # each stage holds the very tensor
    aliases = _aliases(base, gm)
    readers = _readers(aliases, m)
    if not readers:
        return False  # nobody else sees the change
    if _read_through_identities(gm, aliases):
        written = mutated_arg(m, gm)
        assert written is not None
        return _rewrite(gm, m, written)
    _check_views(gm, aliases, base, what, aten)
    _make_data_flow(gm, m, chain, aliases, readers, aten)
    return True


def _make_data_flow(
    gm: fx.GraphModule,
    m: fx.Node,
    chain: list[fx.Node],
    aliases: list[fx.Node],
    readers: list[fx.Node],
    aten: bool,
) -> None:
    """The rewrite of [Note: in-place ops] for m, which writes ``aliases[0]`` (b) through
    ``chain``; ``readers`` read b or its views."""
    base = aliases[0]
    position = {n: k for k, n in enumerate(gm.graph.nodes)}
    start = base
    if any(position[r] < position[m] for r in readers):
        with gm.graph.inserting_before(m):
            if aten:
                start = gm.graph.call_function(torch.ops.aten.clone.default, (base,))
            else:
                start = gm.graph.call_method("clone", (base,))
        start.meta = {k: base.meta[k] for k in _VALUE_META if k in base.meta}
    version = _fuse(gm, m, chain, base, start) if chain else m
    if not chain and start is not base:
        _point_slot(m, mutated_slot(m, gm), start)
    # Whatever reads b, or a view of b made before m, after m reads the new version.
    remade = _Remade(gm, version, base)
    earlier = {n for n in aliases if position[n] < position[m]}
    for node in {u: None for n in earlier for u in n.users if position.get(u, -1) > position[m]}:
        for source in node.all_input_nodes:
            if source in earlier:
                node.replace_input_with(source, remade.of(source))
    if chain:
        m.replace_all_uses_with(remade.of(chain[-1]))
        gm.graph.erase_node(m)


def _read_through_identities(gm: fx.GraphModule, aliases: list[fx.Node]) -> bool:
    """Replace the ``nn.Identity`` calls among ``aliases`` by their input; whether any."""
    found = False
    for node in aliases:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        if isinstance(gm.get_submodule(str(node.target)), nn.Identity):
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            gm.graph.erase_node(node)
            found = True
    return found


def _check_views(
    root: nn.Module, aliases: list[fx.Node], base: fx.Node, what: str, aten: bool
) -> None:
    for node in aliases:
        if node is base or _exact(node, root):
            continue
        if not aten:
            raise TypeError(
                f"{what}, which shares memory with other tensors (a view): the split could "
                f"reorder who sees the change; trace with mode='export'"
            )
        raise TypeError(
            f"{what}, and other nodes read the change through {node.name!r} "
            f"({_describe(node)}), which may or may not share memory with {base.name!r}: "
            f"which of them see it depends on the strides at run time; compute it out of "
            f"place (x = x.op(...)) or make the copy explicit (.clone())"
        )


def _point_slot(m: fx.Node, slot: int | str | None, new: fx.Node) -> None:
    """Make ``m`` mutate ``new``: only the argument it writes changes."""
    if isinstance(slot, int):
        args: list[Any] = list(m.args)
        args[slot] = new
        m.args = tuple(args)
    elif slot is not None:
        m.kwargs = {**m.kwargs, slot: new}


class InplaceThroughView(nn.Module):
    """Views of its first input, then an in-place op on the last view; returns that input
    ([Note: in-place ops]). ``inplace = True`` is what `runtime.mutation` looks for."""

    inplace = True

    def __init__(self, body: fx.GraphModule) -> None:
        super().__init__()
        self.body = body

    def forward(self, *args: Any) -> Any:
        return self.body(*args)


def _fuse(
    gm: fx.GraphModule, m: fx.Node, chain: list[fx.Node], base: fx.Node, start: fx.Node
) -> fx.Node:
    """One ``call_module`` node, in m's place, that takes the views of ``start`` along
    ``chain`` and runs m on the last; it returns ``start`` (mutated)."""
    inside = set(chain) | {base}
    outer: dict[fx.Node, None] = {}
    for node in [*chain, m]:
        for arg in node.all_input_nodes:
            if arg not in inside:
                outer[arg] = None
    sub = fx.Graph()
    env = {base: sub.placeholder("base")}
    for k, node in enumerate(outer):
        env[node] = sub.placeholder(f"arg{k}")
    for node in [*chain, m]:
        env[node] = sub.node_copy(node, env.__getitem__)
    sub.output(env[base])
    module = InplaceThroughView(fx.GraphModule(nn.Module(), sub))
    name, k = "modelsplit_inplace", 0
    while hasattr(gm, f"{name}_{k}"):
        k += 1
    gm.add_submodule(f"{name}_{k}", module)
    with gm.graph.inserting_before(m):
        fused = gm.graph.call_module(f"{name}_{k}", (start, *outer))
    fused.meta = {k: v for k, v in m.meta.items() if k not in _VALUE_META}
    fused.meta.update({k: base.meta[k] for k in _VALUE_META if k in base.meta})
    return fused


class _Remade:
    """The views of ``base`` made again from its new version, just after it."""

    def __init__(self, gm: fx.GraphModule, version: fx.Node, base: fx.Node) -> None:
        self.gm, self.last = gm, version
        self.made: dict[fx.Node, fx.Node] = {base: version}

    def of(self, node: fx.Node) -> fx.Node:
        if node in self.made:
            return self.made[node]
        source = _view_source(node, self.gm)
        assert source is not None
        new_source = self.of(source)
        with self.gm.graph.inserting_after(self.last):
            copy = self.gm.graph.node_copy(node, lambda n: new_source if n is source else n)
        self.made[node] = self.last = copy
        return copy
