"""profile: the CostGraph contract, byte counts, FLOP costs, meta devices."""

from __future__ import annotations

import math
from typing import Any

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from partitioner.capture.binding import program_of
from partitioner.capture.tracer import trace
from partitioner.errors import ModelSplitError
from partitioner.examples import MLP, MODELS, SMALL, small
from partitioner.planner.cost import evaluate, validate_graph
from partitioner.profiling.costgraph import profile

NODE_ATTRS = {
    "time": float,
    "param_bytes": int,
    "out_bytes": int,
    "act_bytes": int,
    "flops": int,
    "bwd_time": float,
    "bwd_flops": int,
    "op": str,
    "target": str,
    "module": str,
    "order": int,
}
GRAPH_ATTRS = {"model", "inputs", "outputs", "params", "ties", "chunks", "batch_size", "cost"}
PROFILED = [name for name in SMALL if name != "data_dependent"]


def unique_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (persistent or not), each tensor once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def real_out_bytes(gm: fx.GraphModule, args: Any, kwargs: Any) -> dict[str, int]:
    program = program_of(gm)
    values = program.bind(args, kwargs)
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*(values[n] for n in program.inputs), enable_io_processing=False)
    return {
        node.name: sum(
            t.numel() * t.element_size()
            for t in pytree.tree_leaves(value)
            if isinstance(t, torch.Tensor)
        )
        for node, value in interp.env.items()
        if node.op != "output"
    }


def check_contract(graph: nx.DiGraph, gm: fx.GraphModule, model: nn.Module) -> None:
    validate_graph(graph)
    assert nx.is_directed_acyclic_graph(graph)
    names = [n.name for n in gm.graph.nodes if n.op != "output"]
    assert list(graph.nodes) == names
    for name, data in graph.nodes(data=True):
        for attr, kind in NODE_ATTRS.items():
            assert isinstance(data[attr], kind), (name, attr, data.get(attr))
        assert data["time"] >= 0 and data["act_bytes"] >= 0
        if data["op"] in ("placeholder", "get_attr"):  # fetching is no work to balance
            assert data["time"] == 0.0, name
    for node in gm.graph.nodes:
        for user in node.users:
            if user.op != "output":
                assert graph.has_edge(node.name, user.name)
    assert set(graph.graph) >= GRAPH_ATTRS
    assert graph.graph["inputs"] == list(program_of(gm).inputs)
    # [Note: weights live with their readers]: each tensor once in the weight table, once on
    # a one-stage plan, and on every reader in the per-node figures the planner sums
    assert sum(graph.graph["weight_bytes"].values()) == unique_bytes(model)
    one = evaluate(graph, dict.fromkeys(graph.nodes, 0), 1, 1e9).stages[0].param_bytes
    assert one == unique_bytes(model)
    assert sum(d for _, d in graph.nodes(data="param_bytes")) >= unique_bytes(model)
    state = set(gm.state_dict()) | {n for n, _ in gm.named_buffers()}
    for used in graph.graph["params"].values():
        assert set(used) <= state


@pytest.mark.parametrize("name", PROFILED)
def test_cost_graph_contract(name: str) -> None:
    model, args, kwargs = small(name, batch=4)
    gm = trace(model, args, kwargs)
    graph = profile(gm, args, kwargs, chunks=2, repeat=1)
    check_contract(graph, gm, model)
    assert graph.graph["chunks"] == 2 and graph.graph["batch_size"] == 4
    assert graph.graph["micro_batch_size"] == 2 and graph.graph["cost"] == "time"
    assert graph.graph["model"] == type(model).__name__
    # out_bytes are the real sizes at the micro-batch (2 of 4 rows)
    micro = pytree.tree_map_only(
        torch.Tensor, lambda t: t[:2] if t.dim() and t.shape[0] == 4 else t, (args, kwargs)
    )
    real = real_out_bytes(gm, *micro)
    for n, d in graph.nodes(data=True):  # weights are placed, never streamed: out_bytes 0
        assert d["out_bytes"] == (0 if d["op"] == "get_attr" else real[n]), n
    assert sum(d for _, d in graph.nodes(data="time")) > 0


def test_export_graph_contract_and_modules() -> None:
    model, args, kwargs = small("gpt", batch=4)
    gm = trace(model, args, kwargs, mode="export")
    graph = profile(gm, args, kwargs, repeat=1)
    check_contract(graph, gm, model)
    modules = {d for _, d in graph.nodes(data="module")}
    assert "blocks.0.attn" in modules and "" in modules
    assert any(d.startswith("aten.") for _, d in graph.nodes(data="target"))


def test_tied_weights_are_counted_once_and_recorded() -> None:
    model, args, _ = small("gpt")
    for mode in ("fx", "export"):
        gm = trace(model, args, mode=mode)
        graph = profile(gm, args, repeat=1)
        assert graph.graph["ties"] == [["head.weight", "tok.weight"]]
        check_contract(graph, gm, model)
        # the tied tensor counts on both of its readers' stages, as the runtime holds it
        (name,) = set(graph.graph["weight_bytes"]) & {"tok.weight", "head.weight"}
        order = list(graph)
        held = graph.graph["held"].items()
        readers = [
            order.index(v) for v, ws in held if name in ws and graph.nodes[v]["op"] != "get_attr"
        ]
        assert len(readers) == 2  # the embedding and the LM head (export adds an unused copy)
        split = {v: 0 if i < max(readers) else 1 for i, v in enumerate(order)}
        ev = evaluate(graph, split, 2, 1e9)
        assert ev.valid
        for stage in ev.stages:
            assert stage.param_bytes >= graph.graph["weight_bytes"][name]


def test_flop_cost_uses_peak_and_bandwidth() -> None:
    model = MLP(width=32, depth=2)
    x = torch.randn(8, 32)
    gm = trace(model, (x,))
    graph = profile(gm, (x,), cost="flops", peak_flops=1e9, mem_bandwidth=1e9)
    assert graph.graph["cost"] == "flops"
    lin = graph.nodes["layers_0"]
    assert lin["flops"] == 2 * 8 * 32 * 32
    moved = 8 * 32 * 4 * 2 + (32 * 32 + 32) * 4  # input and output, weight and bias
    assert math.isclose(lin["time"], lin["flops"] / 1e9 + moved / 1e9)
    assert graph.nodes["x"]["time"] == 0.0


def test_meta_device_model_profiles_by_flops() -> None:
    with torch.device("meta"):
        model = MODELS["gpt"](**SMALL["gpt"])
    ids = torch.randint(0, 64, (4, 16))
    gm = trace(model, (ids,), mode="export")
    graph = profile(gm, (ids,), cost="flops", chunks=2)
    check_contract(graph, gm, model)
    assert graph.graph["device"] == "meta"
    assert sum(d for _, d in graph.nodes(data="flops")) > 0
    tensors = [
        d
        for _, d in graph.nodes(data=True)
        if d["target"] != "aten.sym_size.int" and d["op"] != "get_attr"
    ]
    assert all(d["out_bytes"] > 0 for d in tensors)
    weights = [d for _, d in graph.nodes(data=True) if d["op"] == "get_attr"]
    assert weights and all(d["out_bytes"] == 0 for d in weights)
    with pytest.raises(ValueError, match="meta"):
        profile(gm, (ids,), cost="time", device="meta")


def test_act_bytes_inference_and_training() -> None:
    model = MLP(width=16, depth=2)
    x = torch.randn(8, 16)
    gm = trace(model.eval(), (x,))
    infer = profile(gm, (x,), chunks=2, repeat=1)
    assert infer.graph["training"] is False
    for _, data in infer.nodes(data=True):
        assert data["act_bytes"] == (0 if data["op"] == "get_attr" else data["out_bytes"])
    train = profile(gm, (x,), chunks=2, repeat=1, training=True)
    assert train.graph["training"] is True
    # a Linear saves its input: 4 x 16 floats, one micro-batch's ([Note: act_bytes]; the
    # schedule, not the profile, counts how many micro-batches are alive)
    assert train.nodes["layers_0"]["act_bytes"] == 4 * 16 * 4
    assert sum(d for _, d in train.nodes(data="act_bytes")) > 0


def test_bad_arguments() -> None:
    model, args, _ = small("mlp")
    gm = trace(model, args)
    with pytest.raises(ValueError, match="cost"):
        profile(gm, args, cost="guess")
    with pytest.raises(ValueError, match="chunks"):
        profile(gm, args, chunks=0)
    with pytest.raises(TypeError, match="trace"):
        profile(fx.symbolic_trace(model), args)


def test_silent_without_a_tty(capsys: pytest.CaptureFixture[str]) -> None:
    model, args, _ = small("mlp")
    profile(trace(model, args), args, repeat=1)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@given(
    width=st.integers(1, 24),
    depth=st.integers(1, 4),
    batch=st.integers(1, 9),
    chunks=st.integers(1, 4),
)
def test_mlp_invariants(width: int, depth: int, batch: int, chunks: int) -> None:
    model = MLP(width=width, depth=depth)
    x = torch.randn(batch, width)
    gm = trace(model, (x,), mode="fx")
    graph = profile(gm, (x,), chunks=chunks, cost="flops")
    check_contract(graph, gm, model)
    micro = math.ceil(batch / chunks)
    assert graph.nodes["x"]["out_bytes"] == micro * width * 4
    assert graph.graph["micro_batch_size"] == micro


class _FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).view(12, 4, 4).sum(-1)  # the example's batch size, hard-coded


def test_model_that_fixes_the_batch_size_is_a_clear_error() -> None:
    x = torch.randn(12, 16)
    gm = trace(_FixedBatch(), (x,))  # runs at the example's batch, so it traces
    with pytest.raises(ModelSplitError, match=r"micro-batch of 3 rows \(batch 12 in 4 chunks\)"):
        profile(gm, (x,), chunks=4)
    assert profile(gm, (x,), chunks=1).number_of_nodes() > 0
