"""Split a traced model into one GraphModule per pipeline stage, as a Plan assigns.

`split` applies a plan; it decides nothing. Each stage is a plain
`torch.fx.GraphModule` with flat positional inputs and a tuple output, holding
only the parameters and buffers its own nodes use, under their original
qualified names and as the very same tensor objects as ``gm`` (no data is
copied). What a stage reads and returns is recorded in ``stage.meta["modelsplit"]``
(see [Note: stage interface] in runtime/interface.py).

Where nodes go:

- compute nodes (``call_function``, ``call_method``, ``call_module``) go where
  ``plan.assignment`` says;
- placeholders are model inputs: every stage that needs one takes it as an input;
- a ``get_attr`` (a parameter, buffer or constant) is re-materialised in every
  stage that reads it, so parameters never travel between stages as values; a
  tensor read on two stages (a tied weight) is then held by both stage modules as
  the same object (see `partitioner.splitting.compose.shared_tensors`);
- any other value (a tensor, an int from ``.size()``) a later stage reads is
  returned by its producer's stage and read by its consumers straight from there,
  even if it skips stages.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx
import torch.fx._pytree as fx_pytree
from torch.utils import _pytree as pytree

from partitioner.capture.binding import PROGRAM_KEY, ExportBinder, FxBinder, output_program
from partitioner.capture.inplace import mutation_hazards
from partitioner.errors import PlanError
from partitioner.planner.plan import Plan
from partitioner.splitting.compose import run_stages, shared_tensors
from runtime.interface import Program, StageIO

__all__ = ["program_from_graph", "run_stages", "split"]

log = logging.getLogger(__name__)

#: fx ops that compute something, and so run on the stage the plan gives them.
COMPUTE_OPS = ("call_function", "call_method", "call_module")
#: Node meta worth keeping on a stage's placeholder for a value made elsewhere.
_VALUE_META = ("val", "tensor_meta", "example_value")


@dataclass
class _Layout:
    """Which original nodes each stage copies, reads and returns (all by name)."""

    body: list[list[torch.fx.Node]]
    inputs: list[list[str]]
    outputs: list[list[str]]


def split(gm: torch.fx.GraphModule, plan: Plan) -> list[torch.fx.GraphModule]:
    """One GraphModule per stage of ``plan``; composed they compute ``gm``.

    Raises PlanError when ``plan`` does not fit ``gm`` (a node it lacks or does
    not place, a stage out of range, an edge whose stage goes backwards).
    """
    _check_plan(gm, plan)
    _check_mutations(gm, plan)
    program = gm.meta.get(PROGRAM_KEY)
    if not isinstance(program, Program):
        program = program_from_graph(gm)
    layout = _layout(gm, plan, program.writes)
    stages = [_build_stage(gm, j, layout, program) for j in range(plan.num_stages)]
    for tie in shared_tensors(stages):
        log.debug("%s is held by stages %s (the same tensor object)", tie.names[0], tie.stages)
    log.debug(
        "split %s into %s stages: %s",
        type(gm).__name__,
        len(stages),
        [len(nodes) for nodes in layout.body],
    )
    return stages


# -- checks --------------------------------------------------------------------


def _check_plan(gm: torch.fx.GraphModule, plan: Plan) -> None:
    """PlanError unless ``plan`` places exactly gm's nodes on stages that run forward.

    Placeholders and get_attr nodes are available to every stage, so only edges
    out of compute nodes must keep stage order.
    """
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    edges = nx.DiGraph()
    edges.add_edges_from(
        (u.name, v.name)
        for v in nodes
        for u in v.all_input_nodes
        if u.op in COMPUTE_OPS and v.op != "output"
    )
    names = [n.name for n in nodes]
    plan.validate(names)
    k = plan.num_stages
    for name, j in plan.assignment.items():
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < k:
            raise PlanError(f"plan puts node {name!r} on stage {j!r}, outside 0..{k - 1}")
    plan.validate(names, edges)


def _check_mutations(gm: torch.fx.GraphModule, plan: Plan) -> None:
    """PlanError for an in-place op whose change nodes on other stages see without a data
    edge: only the node order says who reads before and who after, which a split loses
    ([Note: in-place ops] in partitioner/capture/inplace.py). `trace` leaves none."""
    for m, involved in mutation_hazards(gm):
        nodes = [m, *(n for n in involved if n.op in COMPUTE_OPS)]
        stages = sorted({plan.assignment[n.name] for n in nodes})
        if len(stages) > 1:
            others = ", ".join(repr(n.name) for n in nodes[1:])
            raise PlanError(
                f"in-place node {m.name!r} changes a tensor that {others} also read, and the "
                f"plan puts them on stages {stages}: the split could reorder who sees the "
                f"change. Trace the model with partitioner.trace (it makes in-place ops data "
                f"flow) or keep these nodes on one stage"
            )


# -- layout --------------------------------------------------------------------


def _layout(
    gm: torch.fx.GraphModule, plan: Plan, writes: Sequence[tuple[str, str]] = ()
) -> _Layout:
    """Decide, per stage, the nodes to copy and the values to take and return."""
    n = plan.num_stages
    where = plan.assignment
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    homes = _attr_homes(gm, where)
    needs: list[set[str]] = [set() for _ in range(n)]
    gives: list[set[str]] = [set() for _ in range(n)]
    body: list[list[torch.fx.Node]] = [[] for _ in range(n)]

    def read(u: torch.fx.Node, j: int) -> None:
        """Stage j reads u: a model input, or a value another stage returns to it."""
        if u.op == "placeholder":
            needs[j].add(u.name)
        elif u.op in COMPUTE_OPS and where[u.name] != j:
            needs[j].add(u.name)
            gives[where[u.name]].add(u.name)

    for node in gm.graph.nodes:
        if node.op in COMPUTE_OPS:
            body[where[node.name]].append(node)
            for u in node.all_input_nodes:
                read(u, where[node.name])
        elif node.op == "get_attr":
            for j in sorted(homes.get(node.name, ())):
                body[j].append(node)
        elif node.op == "output":
            for u in node.all_input_nodes:
                if u.op in COMPUTE_OPS or u.op == "get_attr":
                    gives[where[u.name]].add(u.name)
    for _, final in writes:  # [Note: writes to model inputs]
        gives[where[final]].add(final)
    return _Layout(
        body=body,
        inputs=[sorted(s, key=order.__getitem__) for s in needs],
        outputs=[sorted(s, key=order.__getitem__) for s in gives],
    )


def _attr_homes(gm: torch.fx.GraphModule, where: Mapping[str, int]) -> dict[str, set[int]]:
    """The stages each get_attr node is copied into: those that read it.

    An attribute the model returns as an output is also held by its planned stage;
    one nobody reads (a tied alias export leaves unused) goes nowhere.
    """
    homes: dict[str, set[int]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        for user in node.users:
            j = where[node.name] if user.op == "output" else where[user.name]
            homes.setdefault(node.name, set()).add(j)
    return homes


# -- stage modules -------------------------------------------------------------


def _build_stage(
    gm: torch.fx.GraphModule, j: int, layout: _Layout, program: Program
) -> torch.fx.GraphModule:
    """Copy stage j's nodes into a fresh graph with flat inputs and a tuple output."""
    nodes = {node.name: node for node in gm.graph.nodes}
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for name in layout.inputs[j]:
        src = nodes[name]
        ph = graph.placeholder(name, type_expr=src.type)
        ph.meta = {k: src.meta[k] for k in _VALUE_META if k in src.meta}
        env[name] = ph
    for node in layout.body[j]:
        env[node.name] = graph.node_copy(node, lambda u: env[u.name])
    graph.output(tuple(env[name] for name in layout.outputs[j]))
    graph.lint()
    # With a module as root, GraphModule copies only the submodules (call_module)
    # and attributes (get_attr) this graph names, along their dotted paths, by
    # reference: the stage shares gm's Parameter and buffer objects.
    stage = torch.fx.GraphModule(gm, graph, class_name=f"Stage{j}")
    stage.meta["modelsplit"] = StageIO(
        stage=j,
        inputs=tuple(layout.inputs[j]),
        outputs=tuple(layout.outputs[j]),
        program=program,
    )
    return stage


# -- program -------------------------------------------------------------------


def program_from_graph(gm: torch.fx.GraphModule) -> Program:
    """A `Program` for a GraphModule that `partitioner.capture.tracer` did not make.

    For `torch.fx.symbolic_trace` graphs (default codegen) a call binds through
    ``gm.forward``'s signature, defaults applied; for ``torch.export(...).module()``
    graphs (pytree codegen) it is flattened with the export's input spec and the
    output rebuilt with its output spec, so dicts and Hugging Face ``ModelOutput``s
    come back as such. Binders and unflatteners are `partitioner.capture.binding`'s.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = tuple(n.name for n in placeholders)
    signature = inspect.signature(gm.forward)
    info: Any = getattr(gm.graph._codegen, "pytree_info", None)
    in_spec = None if info is None else info.in_spec
    bind: Any
    if in_spec is None:
        bind = FxBinder(signature, tuple((str(n.target), n.name) for n in placeholders), ())
    elif _is_args_kwargs(in_spec):
        bind = ExportBinder(signature, in_spec, names, ())
    else:
        bind = _SpecBinder(signature, tuple(info.orig_args), in_spec, names)
    leaves, unflatten = output_program(gm, None if info is None else info.out_spec)
    return Program(inputs=names, output_leaves=leaves, bind=bind, unflatten=unflatten)


def _is_args_kwargs(spec: pytree.TreeSpec) -> bool:
    """Whether ``spec`` flattens ``(args, kwargs)``, as torch.export's input spec does."""
    return (
        spec.type is tuple
        and spec.num_children == 2
        and spec.child(0).type is tuple
        and spec.child(1).type is dict
    )


@dataclass(frozen=True)
class _SpecBinder:
    """Binds a call for an fx graph traced with pytree ``concrete_args``, as its forward does.

    Such a forward flattens ``[self, *args]`` with the input spec, the module
    itself being the first leaf; the placeholders take the leaves after it.
    """

    signature: inspect.Signature
    args: tuple[str, ...]  # the traced function's argument names, ``self`` included
    in_spec: pytree.TreeSpec
    placeholders: tuple[str, ...]

    def __call__(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = [None if a == "self" else bound.arguments[a] for a in self.args]
        flat = fx_pytree.tree_flatten_spec(values, self.in_spec)
        skip = 1 if self.args[:1] == ("self",) else 0
        return dict(zip(self.placeholders, flat[skip:], strict=True))
