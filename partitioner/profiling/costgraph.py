"""Turn a traced module into a CostGraph: one node per fx node, with measured costs.

[Note: act_bytes]
``act_bytes`` is the activation memory a node makes its stage hold for ONE micro-batch, so
that a stage's memory is ``sum(param_bytes + act_bytes)`` over its nodes for each micro-batch
it keeps alive:

- inference (``training=False``): the node's ``out_bytes`` at the micro-batch
  size (0 for ``get_attr`` nodes, whose tensors are ``param_bytes``). A stage
  holds one micro-batch at a time; summing every output is an upper bound on
  its peak (exact when nothing is freed early), so plans err on the safe side.
  ``getitem`` nodes are 0: they pick a piece of a tuple their producer holds.
- training (``training=True``): the bytes autograd saves for backward while the
  node runs on one micro-batch (measured with `saved_tensors_hooks`; parameters and
  tensors saved by an earlier node excluded). How many micro-batches are alive at once
  is the schedule's business, not the profile's: GPipe keeps all ``chunks`` of them
  until their backward, 1F1B at most the number of stages (`partitioner.planner`'s
  simulation multiplies). Profiles before issue 14 multiplied by ``chunks`` here.

A training profile also gives every node ``bwd_time`` (seconds of its backward on a speed-1.0
device per micro-batch) and ``bwd_flops``; see [Note: backward per node] in
`partitioner.profiling.backward`. An inference profile sets both to 0, so they always exist.

``training`` defaults to the mode the model was traced in (``model.training``).

``out_bytes`` of a ``get_attr`` node (a parameter, buffer or constant) is 0: `split`
re-creates the attribute in every stage that reads it rather than sending it, so it
costs memory on each such device, never bandwidth (see [Note: weights do not travel]).

[Note: weights live with their readers]
A weight's bytes belong to the stages that hold it, and a stage holds every weight its nodes
read: a module's own parameters, and the tensors of the ``get_attr``s its nodes read (split
re-creates those there). So a node's ``param_bytes`` are the bytes of the weights it needs,
and a ``get_attr`` that is read has none of its own (an unused duplicate of a tied weight used
to carry GPT-2's 154 MB embedding while the stages reading it were charged nothing). A tied
weight read on two stages counts on both, as the runtime holds a copy on each.
``graph.graph["held"]`` lists each node's weights by one name per tensor and
``graph.graph["weight_bytes"]`` their sizes, so `evaluate` counts a weight once per stage
however many of the stage's nodes read it; the per-node sums the planner's memory constraints
use are never below that (a stage holding two readers of one tied weight is charged twice
there: the planner errs on the safe side).
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from partitioner.capture.binding import program_of
from partitioner.capture.checks import batch_size, fresh, preserved_state
from partitioner.errors import ModelSplitError
from partitioner.profiling.backward import BackwardCosts, measure_backward
from partitioner.profiling.measure import Measurements, measure, nbytes, tensor_key

__all__ = ["COSTS", "DEFAULT_MEM_BANDWIDTH", "DEFAULT_PEAK_FLOPS", "profile"]

logger = logging.getLogger(__name__)

COSTS = ("time", "flops")
DEFAULT_PEAK_FLOPS = 100e12  # FLOP/s of a speed-1.0 device under cost="flops"
DEFAULT_MEM_BANDWIDTH = 1e12  # bytes/s of its memory under cost="flops"


def profile(
    gm: fx.GraphModule,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    chunks: int = 1,
    cost: str = "time",
    repeat: int = 5,
    device: torch.device | str | None = None,
    peak_flops: float = DEFAULT_PEAK_FLOPS,
    mem_bandwidth: float = DEFAULT_MEM_BANDWIDTH,
    training: bool | None = None,
) -> nx.DiGraph:
    """Profile ``gm`` (from `trace`) on a micro-batch of the example call.

    Batched tensor inputs (dim 0 equal to the batch size) are cut to
    ``ceil(batch / chunks)`` rows. ``cost="time"`` times each node: its fastest of
    ``repeat`` passes (more when runs disagree: [Note: timing on a busy machine]), after a
    warm-up pass that also counts FLOPs and bytes.
    ``cost="flops"`` estimates ``flops / peak_flops + bytes moved / mem_bandwidth``
    without timing, and runs on the ``meta`` device when the parameters live
    there. See [Note: act_bytes].

    ``training=True`` (the default when ``gm`` was traced in training mode) also measures
    each node's backward into ``bwd_time`` and ``bwd_flops`` ([Note: backward per node]):
    timed under ``cost="time"``, ``bwd_flops / peak_flops + bytes moved / mem_bandwidth``
    under ``cost="flops"``.
    """
    _check_args(cost, chunks, repeat, peak_flops, mem_bandwidth)
    program = program_of(gm)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    batch, micro = _micro_batch(args, kwargs, chunks)
    if training is None:
        training = bool(gm.meta.get("modelsplit_training", gm.training))
    gm, target = _placed(gm, device, meta=cost == "flops" and _on_meta(gm))
    args, kwargs = fresh(  # the caller's tensors are not written to: a model may write
        pytree.tree_map_only(  # to its input (x.mul_(2)), and profiling runs it many times
            torch.Tensor, lambda t: _cut(t, batch, micro).to(target), (args, kwargs)
        )
    )
    values = program.bind(args, kwargs)
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    try:
        # Several runs of the graph: BatchNorm statistics and the RNG come out unchanged.
        inputs = [values[name] for name in program.inputs]
        with preserved_state(gm):
            found = measure(
                gm,
                inputs,
                timed=cost == "time",
                repeat=repeat,
                training=training,
                exclude={tensor_key(t) for t in _tensors(gm)},
                sync=sync,
            )
            back = BackwardCosts()
            if training:
                back = measure_backward(gm, inputs, timed=cost == "time", repeat=repeat, sync=sync)
    except Exception as exc:
        if micro >= batch:
            raise
        raise _fixed_batch_error(exc, micro, batch, chunks) from exc
    rates = _Rates(cost, peak_flops, mem_bandwidth)
    graph = _cost_graph(gm, found, back, rates, training)
    graph.graph.update(
        model=gm.meta.get("modelsplit_model", type(gm).__name__),
        inputs=list(program.inputs),
        chunks=chunks,
        batch_size=batch,
        micro_batch_size=micro,
        cost=cost,
        training=training,
        device=str(target),
    )
    logger.debug(
        "profiled %s: %d nodes, %.3g s forward and %.3g s backward per micro-batch of %s",
        graph.graph["model"],
        graph.number_of_nodes(),
        sum(t for _, t in graph.nodes(data="time")),
        sum(t for _, t in graph.nodes(data="bwd_time")),
        micro,
    )
    return graph


def _check_args(
    cost: str, chunks: int, repeat: int, peak_flops: float, mem_bandwidth: float
) -> None:
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS} (got {cost!r})")
    if chunks < 1 or repeat < 1:
        raise ValueError(f"chunks and repeat must be >= 1 (got chunks={chunks}, repeat={repeat})")
    if peak_flops <= 0 or mem_bandwidth <= 0:
        raise ValueError(
            f"peak_flops and mem_bandwidth must be > 0 ({peak_flops}, {mem_bandwidth})"
        )


def _fixed_batch_error(exc: Exception, micro: int, batch: int, chunks: int) -> ModelSplitError:
    """The error for a model that runs on the whole batch but not on a micro-batch."""
    first = (str(exc).strip().splitlines() or ["(no message)"])[0]
    return ModelSplitError(
        f"the model fails on a micro-batch of {micro} rows (batch {batch} in {chunks} "
        f"chunks): {type(exc).__name__}: {first}. A model that fixes the batch size (a "
        f"reshape to the example's batch) cannot be micro-batched: take the size from "
        f"x.shape[0], or use chunks=1"
    )


def _micro_batch(args: tuple[Any, ...], kwargs: dict[str, Any], chunks: int) -> tuple[int, int]:
    batch = batch_size(args, kwargs)
    if batch is None:
        return 1, 1
    return batch, max(1, math.ceil(batch / chunks))


def _cut(t: torch.Tensor, batch: int, micro: int) -> torch.Tensor:
    return t[:micro] if t.dim() >= 1 and t.shape[0] == batch and micro < batch else t


def _tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    return [*gm.parameters(), *gm.buffers()]


def _on_meta(gm: fx.GraphModule) -> bool:
    return any(t.is_meta for t in _tensors(gm))


def _placed(
    gm: fx.GraphModule, device: torch.device | str | None, meta: bool
) -> tuple[fx.GraphModule, torch.device]:
    """The module to run and where; a copy when ``device`` is not where its tensors are."""
    here = next(iter(_tensors(gm)), torch.empty(0)).device
    if meta:
        return gm, torch.device("meta")
    target = torch.device(device) if device is not None else here
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if target.type == "meta":
        raise ValueError("cannot time on the meta device: profile with cost='flops'")
    same = target.type == here.type and None in (target.index, here.index)
    if target != here and not same:
        logger.debug("profiling a copy of %s on %s", type(gm).__name__, target)
        gm = copy.deepcopy(gm).to(target)
    return gm, target


def _module_path(n: fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0])
    return ""


def _target_name(n: fx.Node) -> str:
    if isinstance(n.target, str):
        return n.target
    if isinstance(n.target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(n.target)
    try:
        return fx.node._get_qualified_name(n.target)
    except Exception:
        return str(n.target)


def _node_params(gm: fx.GraphModule, n: fx.Node) -> dict[str, torch.Tensor]:
    """The qualified names and tensors of the parameters, buffers and constants ``n`` reads."""
    if n.op == "get_attr":
        value = gm
        for part in str(n.target).split("."):
            value = getattr(value, part)
        return {str(n.target): value} if isinstance(value, torch.Tensor) else {}
    if n.op == "call_module":
        sub = gm.get_submodule(str(n.target))
        named: list[tuple[str, torch.Tensor]] = [*sub.named_parameters(remove_duplicate=False)]
        named += [*sub.named_buffers(remove_duplicate=False)]
        return {f"{n.target}.{k}": t for k, t in named}
    return {}


def _held(
    gm: fx.GraphModule, n: fx.Node, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The weights ``n``'s stage holds for it: a module's own, or those of the ``get_attr``s
    it reads (split re-creates a weight in every stage that reads it, so a get_attr with
    readers holds nothing itself; one that nobody reads stays where it is placed)."""
    if n.op == "get_attr":
        return {} if n.users else tensors
    if n.op == "call_module":
        return tensors
    found: dict[str, torch.Tensor] = {}
    for u in n.all_input_nodes:
        if u.op == "get_attr":
            found.update(_node_params(gm, u))
    return found


def _ties(gm: fx.GraphModule) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    named: list[tuple[str, torch.Tensor]] = [*gm.named_parameters(remove_duplicate=False)]
    named += [*gm.named_buffers(remove_duplicate=False)]
    for name, t in named:
        groups.setdefault(id(t), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


@dataclass(frozen=True)
class _Rates:
    """How seconds are had: ``cost="time"`` measures; ``"flops"`` divides by these rates."""

    cost: str
    peak_flops: float
    mem_bandwidth: float

    def estimate(self, flops: int, moved: int) -> float:
        return flops / self.peak_flops + moved / self.mem_bandwidth


def _no_work(n: fx.Node) -> bool:
    # Fetching an input, a weight or a tuple item is no work: timed, it is ~3.5 µs of
    # interpreter overhead per node, which the planner would balance as compute.
    return n.op in ("placeholder", "get_attr") or n.target is operator.getitem


def _seconds(
    n: fx.Node, found: Measurements, rates: _Rates, tensors: dict[str, torch.Tensor]
) -> float:
    """A node's seconds of work on a speed-1.0 device: measured, or from FLOPs and bytes."""
    if _no_work(n):
        return 0.0
    if rates.cost == "time":
        return float(found.seconds.get(n.name, 0.0))
    moved = found.in_bytes.get(n.name, 0) + found.out_bytes.get(n.name, 0)
    moved += sum(nbytes(t) for t in tensors.values())  # call_module weights
    return rates.estimate(int(found.flops.get(n.name, 0)), moved)


def _bwd_seconds(
    n: fx.Node,
    found: Measurements,
    back: BackwardCosts,
    rates: _Rates,
    tensors: dict[str, torch.Tensor],
) -> float:
    """A node's seconds of backward: measured, or from its backward FLOPs and the bytes it
    moves (reads the outputs' gradients and what forward read, writes the gradients)."""
    if _no_work(n) or n.name not in back.flops:
        return 0.0
    if rates.cost == "time":
        return float(back.seconds.get(n.name, 0.0))
    moved = found.in_bytes.get(n.name, 0) + found.out_bytes.get(n.name, 0)
    moved += sum(nbytes(t) for t in tensors.values()) + back.grad_bytes.get(n.name, 0)
    moved += 3 * back.param_grad_bytes.get(n.name, 0)  # the add into the gradients' sums
    return rates.estimate(back.flops[n.name], moved)


def _cost_graph(
    gm: fx.GraphModule,
    found: Measurements,
    back: BackwardCosts,
    rates: _Rates,
    training: bool,
) -> nx.DiGraph:
    graph = nx.DiGraph()
    canonical: dict[int, str] = {}  # a tensor's one name (the first one seen)
    held: dict[str, list[str]] = {}  # node -> the weights its stage must hold for it
    sizes: dict[str, int] = {}  # weight -> bytes
    params: dict[str, list[str]] = {}
    outputs: list[str] = []
    for order, n in enumerate(gm.graph.nodes):
        if n.op == "output":
            outputs = list(dict.fromkeys(u.name for u in n.all_input_nodes))
            continue
        tensors = _node_params(gm, n)
        if tensors:
            params[n.name] = list(tensors)
        # [Note: weights live with their readers]
        mine = _held(gm, n, tensors)
        if mine:
            held[n.name] = sorted({canonical.setdefault(id(t), name) for name, t in mine.items()})
            for t in mine.values():
                sizes.setdefault(canonical[id(t)], nbytes(t))
        param_bytes = sum(sizes[c] for c in held.get(n.name, ()))
        # [Note: weights do not travel] split re-creates a get_attr in every stage that
        # reads it, so a weight is placed once per device, never streamed per micro-batch:
        # its bytes are param_bytes, and its out_bytes (what a stage would receive) are 0.
        out_bytes = 0 if n.op == "get_attr" else found.out_bytes.get(n.name, 0)
        flops = int(found.flops.get(n.name, 0))
        if training:  # [Note: act_bytes]: one micro-batch's
            act = found.saved_bytes.get(n.name, 0)
        else:
            view = n.op == "get_attr" or n.target is operator.getitem  # no new memory
            act = 0 if view else out_bytes
        graph.add_node(
            n.name,
            time=_seconds(n, found, rates, tensors),
            bwd_time=_bwd_seconds(n, found, back, rates, tensors),
            bwd_flops=int(back.flops.get(n.name, 0)),
            param_bytes=param_bytes,
            out_bytes=out_bytes,
            act_bytes=act,
            flops=flops,
            op=n.op,
            target=_target_name(n),
            module=_module_path(n),
            order=order,
        )
        for u in n.all_input_nodes:
            graph.add_edge(u.name, n.name)
    graph.graph.update(
        outputs=outputs, params=params, ties=_ties(gm), held=held, weight_bytes=sizes
    )
    return graph
