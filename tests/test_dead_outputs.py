"""Tuple outputs: an unused item is dropped, and a used item stays with the tuple's producer,
so no stage boundary carries a whole tuple (nn.MultiheadAttention returns (out, weights))."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter, profile, solve, trace
from partitioner.planner.coarsen import reduce_exact


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h)  # the weights are never read
        return self.out(a + h)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_unused_items_are_dropped_and_used_ones_join_their_producer(mode: str) -> None:
    model, x = Attention().eval(), torch.randn(4, 6, 16)
    gm = trace(model, (x,), mode=mode)
    items = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert all(n.users for n in items)  # the weights' item is gone
    assert items or mode == "export"  # export decomposes the attention into aten ops
    graph = profile(gm, (x,))
    for n in items:
        assert graph.nodes[n.name]["time"] == 0.0  # an index is no work
    owner = reduce_exact(graph, memory_limited=False).owner
    for n in items:
        (producer,) = n.all_input_nodes
        assert owner[n.name] == owner[producer.name], n.name
    plan = solve(graph, devices=3, bandwidth=1e6)
    for n in items:
        (producer,) = n.all_input_nodes
        assert plan.assignment[n.name] == plan.assignment[producer.name]


def test_split_attention_is_the_model() -> None:
    model, x = Attention().eval(), torch.randn(8, 6, 16)
    splitter = ModelSplitter(model, devices=["cpu:0", "cpu:1", "cpu:2"], example_inputs=(x,))
    torch.testing.assert_close(splitter(x), model(x))
