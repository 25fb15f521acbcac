"""Models whose top-level names clash with GraphModule's own ([Note: clashing names])."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter, trace
from partitioner.capture.names import GRAPH_MODULE_NAMES, RENAMED_KEY, renamed_root


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))


class Clashing(nn.Module):
    """A submodule ``meta`` (fx's dict), a parameter ``graph`` (a property), a buffer ``code``
    and a LayerNorm ``recompile`` (a method), beside an entry ``meta_`` that takes the first
    free name."""

    def __init__(self) -> None:
        super().__init__()
        self.meta, self.meta_, self.body = _mlp(), _mlp(), _mlp()
        self.graph = nn.Parameter(torch.randn(8))
        self.register_buffer("code", torch.linspace(-1, 1, 8))
        self.recompile = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.meta(x) * self.graph + self.code
        return self.body(self.recompile(self.meta_(h)))


def test_the_names_that_clash_are_graph_module_attributes() -> None:
    assert {"meta", "graph", "code", "recompile", "print_readable"} <= GRAPH_MODULE_NAMES
    assert "forward" not in GRAPH_MODULE_NAMES and "training" not in GRAPH_MODULE_NAMES


def test_no_clash_traces_the_model_itself() -> None:
    model = nn.Sequential(_mlp(), _mlp())
    assert renamed_root(model) == (model, {})


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_trace_holds_clashing_names_under_free_ones(mode: str) -> None:
    torch.manual_seed(0)
    model = Clashing().eval()
    x = torch.randn(4, 8)
    gm = trace(model, (x,), mode=mode)
    renamed = gm.meta[RENAMED_KEY]
    assert renamed == {
        "code_": "code",
        "graph_": "graph",
        "meta__": "meta",
        "recompile_": "recompile",
    }
    assert "meta_" not in renamed  # the model's own meta_ keeps its name
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert isinstance(gm.meta, dict)  # GraphModule's own attribute is intact
    # the model itself is untouched: same class, same registries
    assert type(model) is Clashing and "meta" in model._modules and "graph" in model._parameters


def test_leaf_modules_name_the_models_own_submodule() -> None:
    model = Clashing().eval()
    gm = trace(model, (torch.randn(4, 8),), mode="fx", leaf_modules=["meta"])
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "meta__" in called  # kept whole, not traced through


@pytest.mark.parametrize("mode", ["fx", "export"])
@pytest.mark.parametrize("backward", ["autograd", "pipelined"])
def test_split_model_with_clashing_names_is_the_model(mode: str, backward: str) -> None:
    torch.manual_seed(0)
    model = Clashing().train()
    reference = Clashing().train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 8)
    splitter = ModelSplitter(
        model,
        num_devices=3,
        chunks=2,
        example_inputs=(x,),
        trace_mode=mode,
        backward=backward,
    )
    assert len(splitter.stages) >= 2
    assert list(splitter.state_dict()) == list(reference.state_dict())
    stage_params = {id(p) for stage in splitter.stages for p in stage.parameters()}
    assert stage_params == {id(p) for p in model.parameters()}  # the model's own objects

    out = splitter(x)
    want = reference(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    want.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # a checkpoint of the model loads into the splitter and back
    fresh = Clashing()
    splitter.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(model.graph.detach(), fresh.graph.detach())


def test_the_distributed_split_holds_the_models_own_tensors_under_clashing_names() -> None:
    from runtime.distributed.engine import split_for_ranks

    model, x = Clashing().eval(), torch.randn(6, 8)
    splitter = ModelSplitter(model, num_devices=2, chunks=2, example_inputs=(x,))
    stages = split_for_ranks(model, (x,), {}, splitter.plan)
    held = {id(t) for stage in stages for t in [*stage.parameters(), *stage.buffers()]}
    assert held == {id(t) for t in [*model.parameters(), *model.buffers()]}
