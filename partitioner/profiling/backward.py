"""Per-node backward costs of an fx graph: autograd's backward of each node, timed and counted.

[Note: backward per node]
A stage's backward is the backward of its nodes, so each node gets its own. `measure_backward`
runs the graph once more (an fx `Interpreter`, grad enabled) and, at each node whose outputs
require grad, runs the node again on detached copies of the float inputs that require grad
in that pass (activations downstream of a parameter, and the parameters) and calls
``torch.autograd.grad(outputs, inputs + parameters, ones, allow_unused=True)``. Inputs that do
not require grad there (the model's own inputs, integer tensors, buffers) stay constants, so
the first layer does not pay for a gradient that training never computes. Only outputs the
graph reads count (of a tuple, the items a ``getitem`` takes), and only float ones that require
grad. The first call counts FLOPs (`FlopCounterMode`, so it also runs on ``meta``); with
``timed`` it is also the first of up to ``max(2, repeat)`` timed runs on the same graph
(``retain_graph``), and the node's figure is the fastest, as in forward timing; nodes whose
runs disagree get a second set ([Note: timing on a busy machine]). Noise and counting only add
time, so the runs stop once the two fastest agree within `AGREE` (10%): that keeps the
profile within ~3x of a forward-only one (GPT-2 small's lm_head and embedding backward each
write a 154 MB gradient, ~80 ms a call on one core). Nodes with nothing to differentiate
(placeholders, ``get_attr``, ``getitem``, ops on integers, ops none of whose inputs require
grad) cost 0.

A node with parameters also pays, per micro-batch, the add of their gradients into the
step's sums (autograd's ``AccumulateGrad`` into ``.grad``, or the runtime's sum over
micro-batches: `runtime.grads.accumulate`): a pass over three parameter-sized tensors, which
for a wide layer on a small micro-batch is a third of its backward (a 1024 x 1024 Linear on
16 rows: ~0.6 ms of ~1.7 ms on one core). It is timed (`_accumulate_seconds`, fastest of 3, and
on a CPU at least the bytes over the memory's rate, as in a step the sums are cold) and
added to the node's figure, for every micro-batch: the first one of a step, whose
gradient is kept as it is, is charged it too (1/M of it is an overestimate).

What it leaves out: each node's figure includes one ``autograd.grad`` call's overhead (some
µs on a CPU; the engine pays some of it per node in a whole backward too), and gradient
accumulation where an activation has several readers (an add of two gradients) is not timed.
An in-place op runs on private copies (it would otherwise write the pass's tensors twice).
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

import partitioner.profiling.measure as measure
from partitioner.profiling.measure import Progress, disagreeing, nbytes, us
from runtime.mutation import mutated_arg

__all__ = ["BackwardCosts", "measure_backward"]

logger = logging.getLogger(__name__)


@dataclass
class BackwardCosts:
    """What `measure_backward` found, keyed by node name (nodes without backward absent)."""

    seconds: dict[str, float] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    grad_bytes: dict[str, int] = field(default_factory=dict)  # the gradients it writes
    #: bytes of its parameters' gradients, which each micro-batch adds into their sums
    param_grad_bytes: dict[str, int] = field(default_factory=dict)
    #: seconds of those adds (timed runs only): part of ``seconds``
    accumulate: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # node -> why its backward failed


@dataclass
class _Local:
    """One node's backward problem: its outputs, the leaves to differentiate, the seeds."""

    outputs: list[torch.Tensor]
    inputs: list[torch.Tensor]
    seeds: list[torch.Tensor]
    #: which of ``inputs`` are parameters (leaves of the model, not activations)
    params: list[bool] = field(default_factory=list)

    def grad(self) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(
            self.outputs, self.inputs, self.seeds, retain_graph=True, allow_unused=True
        )


def _wants_grad(t: Any) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.requires_grad
        and (t.is_floating_point() or t.is_complex())
    )


def _read_outputs(n: fx.Node, out: Any) -> list[torch.Tensor]:
    """The tensors of ``out`` the graph reads: of a tuple whose readers are all ``getitem``s,
    the items they take (``native_layer_norm``'s mean and rstd get no gradient)."""
    items = out
    if isinstance(out, tuple | list) and n.users:
        picks = [u.args[1] for u in n.users if u.target is operator.getitem]
        ints = sorted({i for i in picks if isinstance(i, int)})
        if len(picks) == len(n.users) and all(isinstance(i, int) for i in picks):
            items = [out[i] for i in ints]
    return [t for t in pytree.tree_leaves(items) if isinstance(t, torch.Tensor)]


class _Sweep(fx.Interpreter):
    """An Interpreter that hands ``on_node`` each differentiable node's backward problem."""

    def __init__(self, gm: fx.GraphModule, on_node: Callable[[fx.Node, _Local], None]) -> None:
        super().__init__(gm)
        self.on_node = on_node
        self.only: set[str] | None = None  # the nodes to visit (None: all)
        self.shapes_only = False  # count FLOPs and bytes only: no values needed

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = getattr(self, n.op)(n.target, args, kwargs)
            skip = n.op in ("placeholder", "get_attr", "output") or n.target is operator.getitem
            wanted = self.only is None or n.name in self.only
            if not skip and wanted and any(_wants_grad(t) for t in _read_outputs(n, out)):
                local = self._local(n, args, kwargs)
                if local is not None:
                    self.on_node(n, local)
            return out

    def _local(self, n: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Local | None:
        """``n`` run again on fresh leaves, as its own autograd graph: on ``meta`` copies when
        only FLOPs and bytes are wanted, unless the op needs values (``nonzero``, masks)."""
        if self.shapes_only:
            try:
                return self._rerun(n, args, kwargs, meta=True)
            except Exception as exc:  # a data-dependent op: counted on the real values
                logger.debug("backward of %s counted on real values: %s", n.name, exc)
        return self._rerun(n, args, kwargs, meta=False)

    def _rerun(
        self, n: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], meta: bool
    ) -> _Local | None:
        writes = mutated_arg(n, self.module) is not None  # write to copies, not the pass's
        leaves: list[torch.Tensor] = []

        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("meta") if meta else t.detach().clone()

        def leaf(t: torch.Tensor) -> torch.Tensor:
            if not _wants_grad(t):
                return copy(t) if meta or writes else t
            x = (copy(t) if meta or writes else t.detach()).requires_grad_()
            leaves.append(x)
            return x.clone() if writes else x  # autograd forbids writing a leaf

        def kept(t: torch.Tensor) -> torch.Tensor:  # which leaves are the model's parameters
            x = leaf(t)
            if len(leaves) > len(is_param):
                is_param.append(t.is_leaf)
            return x

        is_param: list[bool] = []
        a, k = pytree.tree_map_only(torch.Tensor, kept, (args, kwargs))
        params: list[torch.Tensor] = []
        if n.op == "call_module" and meta:  # the module's weights on meta too
            sub = self.fetch_attr(str(n.target))
            state = {name: copy(t) for name, t in [*sub.named_parameters(), *sub.named_buffers()]}
            for name, t in sub.named_parameters():
                params += [state[name].requires_grad_()] if t.requires_grad else []
            out = torch.func.functional_call(sub, state, a, k)
        else:
            out = getattr(self, n.op)(n.target, a, k)
            if n.op == "call_module":
                params = [
                    p for p in self.fetch_attr(str(n.target)).parameters() if p.requires_grad
                ]
        outputs = [t for t in _read_outputs(n, out) if _wants_grad(t)]
        if not outputs or not leaves + params:
            return None
        seeds = [torch.ones_like(t) for t in outputs]
        return _Local(outputs, leaves + params, seeds, is_param + [True] * len(params))


def measure_backward(
    gm: fx.GraphModule,
    inputs: Sequence[Any],
    *,
    timed: bool,
    repeat: int,
    sync: Callable[[], None] = lambda: None,
) -> BackwardCosts:
    """Count, and with ``timed`` time, each node's backward ([Note: backward per node]).

    ``inputs`` are the positional placeholder values, as for `measure`; the caller keeps
    the module's state (`preserved_state`): the passes run BatchNorm and dropout again.
    """
    found = BackwardCosts()
    samples: dict[str, list[float]] = {}
    measured: list[float] = []

    def rate() -> float:  # measured once, on the first node with parameters
        if not measured:
            measured.append(stream_rate())
        return measured[0]

    total = sum(n.op not in ("placeholder", "output") for n in gm.graph.nodes)
    progress = Progress(total, "profiling backward")

    def first(n: fx.Node, local: _Local) -> None:
        try:
            sync()
            start = time.perf_counter()
            with FlopCounterMode(display=False) as counter:
                grads = local.grad()
            sync()
            counted = time.perf_counter() - start  # a run too: noise and counting only add
            found.flops[n.name] = int(counter.get_total_flops())
            found.grad_bytes[n.name] = sum(nbytes(g) for g in grads if g is not None)
            mine = [g for g, p in zip(grads, local.params, strict=True) if p and g is not None]
            if mine:
                found.param_grad_bytes[n.name] = sum(nbytes(g) for g in mine)
            if timed:
                samples[n.name] = _timings(local, repeat, sync, [counted])
                if mine:
                    found.accumulate[n.name] = _accumulate_seconds(mine, sync, rate)
        except RuntimeError as exc:  # an op without a derivative: named in a warning
            found.failed[n.name] = str(exc).strip().splitlines()[0] if str(exc) else "?"
        progress.advance()

    def again(n: fx.Node, local: _Local) -> None:
        samples[n.name] += _timings(local, repeat, sync)

    sweep = _Sweep(gm, first)
    sweep.shapes_only = not timed
    try:
        with torch.enable_grad():
            sweep.run(*inputs, enable_io_processing=False)
            noisy = disagreeing(samples) if timed else []
            if noisy:  # [Note: timing on a busy machine]: a second set for those nodes
                sweep.on_node, sweep.only = again, set(noisy)
                sweep.run(*inputs, enable_io_processing=False)
                _warn_noisy(disagreeing(samples), samples)
    finally:
        progress.close()
    found.seconds = {
        name: measure.ESTIMATE(s) + found.accumulate.get(name, 0.0) for name, s in samples.items()
    }
    if found.failed:
        name, why = next(iter(found.failed.items()))
        logger.warning(
            "profile: the backward of %d node(s) failed and counts as 0, e.g. %s: %s",
            len(found.failed),
            name,
            why,
        )
    return found


#: timed backward runs of a node stop early once its two fastest agree within this factor
AGREE = 1.1


def _timings(
    local: _Local, repeat: int, sync: Callable[[], None], runs: list[float] | None = None
) -> list[float]:
    """``runs`` and more, up to ``repeat`` in all; fewer once the two fastest agree ([Note:
    backward per node]): a run that matches another is the quiet machine's figure already."""
    runs = list(runs or [])
    while len(runs) < repeat or len(runs) < 2:
        sync()
        start = time.perf_counter()
        local.grad()
        sync()
        runs.append(time.perf_counter() - start)
        fastest = sorted(runs)[:2]
        if len(fastest) == 2 and fastest[1] <= AGREE * fastest[0]:
            break
    return runs


def _accumulate_seconds(
    grads: Sequence[torch.Tensor], sync: Callable[[], None], rate: Callable[[], float]
) -> float:
    """Seconds to add ``grads`` into sums of their own, as a step does for every micro-batch
    after the first ([Note: backward per node]): the fastest of three timed adds, or the
    bytes moved at the memory's rate (`stream_rate`) when that is longer: in a step the
    sums are cold, evicted by the other layers' work since the last micro-batch."""
    sums = [g.detach().clone() for g in grads]
    runs = []
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for total, g in zip(sums, grads, strict=True):
            total.add_(g)
        sync()
        runs.append(time.perf_counter() - start)
    if grads[0].device.type != "cpu":
        return min(runs)
    return max(min(runs), 3 * sum(nbytes(g) for g in grads) / rate())


#: bytes of each of the two tensors `stream_rate` adds: past the last-level cache of most CPUs
STREAM_BYTES = 64 * 1024 * 1024


def stream_rate() -> float:
    """Bytes per second that ``a.add_(b)`` moves (reads a and b, writes a) on tensors too big
    for the caches: fastest of three, on this thread's intra-op threads."""
    a = torch.ones(STREAM_BYTES // 4)
    b = torch.ones(STREAM_BYTES // 4)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        a.add_(b)
        runs.append(time.perf_counter() - start)
    return 3 * STREAM_BYTES / max(min(runs), 1e-9)


def _warn_noisy(noisy: list[str], samples: dict[str, list[float]]) -> None:
    if noisy:
        logger.warning(
            "profile: backward timing is noisy here: %d node(s) still disagree after a second "
            "set of runs, e.g. %s; the plan uses each node's fastest run",
            len(noisy),
            ", ".join(f"{n} (fastest {us(min(samples[n]))})" for n in noisy[:3]),
        )
