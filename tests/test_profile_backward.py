"""profile(training=True): per-node backward costs and per-micro-batch act_bytes."""

from __future__ import annotations

import logging
import time
from typing import Any

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.passes.split_module import split_module
from torch.utils.flop_counter import FlopCounterMode

from partitioner.capture.tracer import trace
from partitioner.examples import MLP
from partitioner.profiling.costgraph import profile


class Mixed(nn.Module):
    """Every kind of node: nothing to differentiate (input-only, integer, getitem, get_attr)
    and real backward (linear, matmul, conv, in-place relu)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 16))
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        scaled = x * 2.0  # reads no parameter: nothing to differentiate
        count = (idx + 1).float().sum()  # integer ops
        h = self.act(self.lin(scaled))
        a, b = h.chunk(2, dim=-1)  # getitem
        m = torch.matmul(h, self.w)  # get_attr + matmul
        c = self.conv(m.reshape(-1, 4, 4))
        return c.sum() + (a * b).sum() + count


def _mixed() -> tuple[fx.GraphModule, tuple[torch.Tensor, torch.Tensor]]:
    args = (torch.randn(8, 16), torch.arange(8))
    return trace(Mixed(), args, mode="fx"), args


#: Mixed's nodes with nothing to differentiate: the inputs, the weight fetch, the ops on the
#: input alone (``x * 2``) and on integers (``idx + 1``, ``.float()``, its sum), the getitems
ZERO = {"x", "idx", "w", "mul", "add", "float_1", "sum_1", "getitem", "getitem_1"}


def test_bwd_time_is_zero_where_nothing_is_differentiated(caplog: Any) -> None:
    gm, args = _mixed()
    with caplog.at_level(logging.WARNING, logger="partitioner.profiling.backward"):
        graph = profile(gm, args, training=True, repeat=2)
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
    assert set(graph.nodes) > ZERO
    for name, data in graph.nodes(data=True):
        assert isinstance(data["bwd_time"], float) and isinstance(data["bwd_flops"], int)
        if name in ZERO:
            assert data["bwd_time"] == 0.0 and data["bwd_flops"] == 0, name
        else:  # every other node reads something that requires grad: views, sums, adds too
            assert data["bwd_time"] > 0, name
    for name in ("lin", "matmul", "conv"):
        assert graph.nodes[name]["bwd_flops"] > 0, name


def test_inference_profile_has_zero_bwd_time() -> None:
    gm, args = _mixed()
    graph = profile(gm, args, training=False, repeat=1)
    assert all(d["bwd_time"] == 0.0 and d["bwd_flops"] == 0 for _, d in graph.nodes(data=True))


def test_eval_trace_profiled_for_training_and_export_graphs() -> None:
    """training is a profile argument: an eval-mode trace still gets backward costs, and an
    aten graph (torch.export: weights as get_attr, addmm/mm) too."""
    model = MLP(width=16, depth=2).eval()
    x = torch.randn(4, 16)
    gm = trace(model, (x,), mode="export")
    graph = profile(gm, (x,), training=True, repeat=2)
    for name, data in graph.nodes(data=True):
        if data["op"] in ("placeholder", "get_attr"):
            assert data["bwd_time"] == 0.0, name
    mats = [d for _, d in graph.nodes(data=True) if d["flops"] > 0]
    assert len(mats) == 2 and all(d["bwd_time"] > 0 and d["bwd_flops"] > 0 for d in mats)


def test_linear_backward_flops_are_twice_forward() -> None:
    """Counted with FlopCounterMode on the node's backward: a Linear whose input needs its
    gradient does two matmuls of the forward's size; the first one (input from the data) one."""
    width, batch = 32, 8
    model = MLP(width=width, depth=2)
    x = torch.randn(batch, width)
    graph = profile(trace(model, (x,)), (x,), training=True, cost="flops", mem_bandwidth=1e30)
    first, second = graph.nodes["layers_0"], graph.nodes["layers_1"]
    forward = 2 * batch * width * width
    assert first["flops"] == second["flops"] == forward
    assert second["bwd_flops"] == 2 * forward and first["bwd_flops"] == forward
    lin = nn.Linear(width, width)
    h = torch.randn(batch, width, requires_grad=True)
    out = lin(h)
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(out, (h, *lin.parameters()), torch.ones_like(out))
    assert second["bwd_flops"] == counter.get_total_flops()
    # bytes cost nothing at this bandwidth: the estimate is FLOPs at the peak rate
    assert second["bwd_time"] == pytest.approx(2 * forward / 100e12)


def test_flops_backward_on_meta() -> None:
    with torch.device("meta"):
        model = MLP(width=32, depth=3)
    x = torch.randn(8, 32, device="meta")
    gm = trace(model, (x,))
    graph = profile(gm, (x,), training=True, cost="flops")
    assert graph.graph["device"] == "meta"
    cpu = torch.randn(8, 32)
    real = profile(trace(MLP(width=32, depth=3), (cpu,)), (cpu,), training=True, cost="flops")
    for name, data in graph.nodes(data=True):
        assert data["bwd_flops"] == real.nodes[name]["bwd_flops"], name
        assert data["bwd_time"] == pytest.approx(real.nodes[name]["bwd_time"]), name
    assert graph.nodes["layers_2"]["bwd_time"] > graph.nodes["layers_2"]["time"] > 0


def test_training_act_bytes_are_per_micro_batch() -> None:
    model = MLP(width=16, depth=3)
    b = 4
    gm = trace(model, (torch.randn(b, 16),))
    one = profile(gm, (torch.randn(b, 16),), chunks=1, repeat=1, training=True)
    two = profile(gm, (torch.randn(2 * b, 16),), chunks=2, repeat=1, training=True)
    assert two.graph["micro_batch_size"] == one.graph["micro_batch_size"] == b
    acts = dict(one.nodes(data="act_bytes"))
    assert acts == dict(two.nodes(data="act_bytes"))
    assert acts["layers_0"] == b * 16 * 4  # a Linear saves its input, one micro-batch of it


# --- the whole-stage check: sum of node backward against a stage's own backward ---------


def _stage_inputs(gm: fx.GraphModule, split: fx.GraphModule, x: torch.Tensor) -> list[Any]:
    """The positional inputs each stage of ``split`` receives when it runs on ``x``."""
    seen: list[Any] = []
    hooks = [
        getattr(split, name).register_forward_pre_hook(lambda _, a: seen.append(a))
        for name in ("submod_0", "submod_1")
    ]
    with torch.enable_grad():
        split(x)
    for h in hooks:
        h.remove()
    return seen


def _measured_backward(stage: nn.Module, args: tuple[Any, ...], runs: int) -> float:
    """The stage's own backward, fastest of ``runs``: autograd.grad of its outputs over its
    inputs that need a gradient (activations) and its parameters."""
    best = float("inf")
    for _ in range(runs):
        leaves = [a.detach().requires_grad_() if a.requires_grad else a for a in args]
        out = stage(*leaves)
        outs = [t for t in pytree.tree_leaves(out) if t.requires_grad]
        wrt = [a for a in leaves if a.requires_grad] + [*stage.parameters()]
        seeds = [torch.ones_like(t) for t in outs]
        start = time.perf_counter()
        torch.autograd.grad(outs, wrt, seeds, allow_unused=True)
        best = min(best, time.perf_counter() - start)
    return best


def test_node_backward_sums_to_the_stage_backward() -> None:
    """Each half of a 6-layer MLP run as its own module: its backward against the sum of its
    nodes' bwd_time. Noise only adds time, on both sides, so the stage's figure is its
    fastest run over up to 4 rounds of 10 and the prediction the least of up to 4 profiles
    (a round ends the wait once both ratios are in range)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: one thread per measurement is the steadiest
    try:
        model = MLP(width=512, depth=6)
        x = torch.randn(256, 512)
        gm = trace(model, (x,))
        graph = profile(gm, (x,), training=True, repeat=5)
        order = list(nx.topological_sort(graph))
        halves = [set(order[: len(order) // 2]), set(order[len(order) // 2 :])]
        split = split_module(gm, gm, lambda n: 0 if n.name in halves[0] else 1)
        inputs = _stage_inputs(gm, split, x)
        predicted = [sum(graph.nodes[v]["bwd_time"] for v in names) for names in halves]
        measured = [float("inf")] * 2
        for attempt in range(4):
            if attempt:  # a profile taken during a burst of noise: take another
                again = profile(gm, (x,), training=True, repeat=5)
                sums = [sum(again.nodes[v]["bwd_time"] for v in names) for names in halves]
                predicted = [min(p, s) for p, s in zip(predicted, sums, strict=True)]
            for j in range(2):
                stage = getattr(split, f"submod_{j}")
                measured[j] = min(measured[j], _measured_backward(stage, inputs[j], runs=10))
            ratios = [p / m for p, m in zip(predicted, measured, strict=True)]
            if all(0.5 <= r <= 2.0 for r in ratios):
                break
    finally:
        torch.set_num_threads(threads)
    assert all(0.5 <= r <= 2.0 for r in ratios), (
        f"predicted / measured backward per half: {[round(r, 3) for r in ratios]} "
        f"(predicted {predicted} s, measured {measured} s)"
    )
