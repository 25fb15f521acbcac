"""A model's plain Python state through planning ([Note: plain attributes] in
`partitioner.capture.state`): kept as it was, and a cache of parameter-derived tensors is never
a silent loss of gradients (issue 15: timm LeViT's eval-mode ``attention_bias_cache``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter
from partitioner.capture.state import preserved_attributes
from partitioner.errors import TraceError


class _Cached(nn.Module):
    """LeViT's pattern: in eval mode a tensor computed from a parameter is cached in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.bias = nn.Parameter(torch.randn(16))
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> _Cached:
        super().train(mode)
        if mode:
            self.cache = {}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.fc(x) + self.bias * 2
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.fc(x) + self.cache[key]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_Cached() for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).tanh()


def _split(model: nn.Module, x: torch.Tensor) -> ModelSplitter:
    return ModelSplitter(
        model, 2, chunks=2, example_inputs=(x,), trace_mode="export", time_limit=2, cost="flops"
    )


@pytest.mark.filterwarnings("ignore:The tensor attributes")
def test_planning_leaves_the_cache_as_it_was_and_gradients_match() -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(8, 16)
    fresh = copy.deepcopy(model)
    split = _split(model, x)
    assert all(block.cache == {} for block in model.blocks)  # planning filled it: put back
    out = split(x)
    expected = fresh(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_cache_holding_parameter_gradients_is_refused_for_backward_not_lost() -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(8, 16)
    model(x)  # in grad mode: the caches hold tensors autograd ties to the parameters
    split = _split(model, x)
    with torch.no_grad():
        torch.testing.assert_close(split(x), model(x))  # inference is right
    loss = split(x).sum()
    with pytest.raises(TraceError, match=r"blocks\.\d\.cache\['cpu'\].*inference only"):
        loss.backward()


def test_preserved_attributes_puts_every_kind_of_change_back() -> None:
    module = nn.Linear(2, 2)
    module.table = {"a": 1}  # type: ignore[assignment]
    module.seen = [1]  # type: ignore[assignment]
    module.count = torch.zeros(3)  # type: ignore[assignment]
    module.name = "x"  # type: ignore[assignment]
    module.tensors = {"k": torch.ones(2)}  # type: ignore[assignment]
    table, seen, kept = module.table, module.seen, module.tensors["k"]
    with preserved_attributes(module):
        module.tensors["k"] = torch.zeros(2)  # a tensor value replaced: no elementwise ==
        module.table["b"] = 2
        module.seen.append(2)
        module.count += 1
        module.name = "y"  # type: ignore[assignment]
        module.added = True  # type: ignore[assignment]
        with torch.no_grad():
            module.weight.add_(1)  # parameters are not plain attributes: left alone
    assert module.table is table and module.table == {"a": 1}
    assert module.seen is seen and module.seen == [1]
    assert torch.equal(module.count, torch.zeros(3))
    assert module.name == "x" and not hasattr(module, "added")
    assert module.tensors["k"] is kept
    assert module.weight.requires_grad
