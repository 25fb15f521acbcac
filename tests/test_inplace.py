"""In-place ops in fx graphs: every split keeps eager semantics ([Note: in-place ops])."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter
from partitioner.capture.inplace import functionalize_inplace, mutation_hazards
from partitioner.capture.tracer import trace
from partitioner.errors import PlanError, TraceError
from partitioner.splitting.compose import run_stages
from partitioner.splitting.cut import split
from runtime import Pipeline
from runtime.mutation import mutated_inputs
from tests.test_inplace_cuts import SideReader  # the relu_ through an Identity
from tests.test_split import COMPUTE, plan_for


class Discarded(nn.Module):
    """In-place methods whose results are dropped: only the node order says they come first."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y += 1
        y.relu_()
        z = self.b(y)
        z.mul_(2)
        return z + x


class ReadBefore(nn.Module):
    """A reader of ``h`` before its mutation must see the old value wherever it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        before = self.b(h)  # reads h as it is now
        h.mul_(3).add_(h)  # then h changes; add_ reads the mutated h
        return before + h


class InplaceModules(nn.Module):
    """The common, already-safe case: nn.ReLU(inplace=True) on a value nobody else reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.a(x))
        out += x
        return self.b(self.act(out))


class MutatesView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h[:, :4].mul_(0)  # changes h through a view
        return h * 2


class CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # a buffer mutation that must persist
        return self.a(x)


class AssignsInto(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h[:, :2] = 0  # operator.setitem: returns nothing to read instead of h
        return self.b(h)


class WritesOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        torch.mul(x, 2, out=h)  # writes h
        return self.b(h)


class ReadsShape(nn.Module):
    """``h.shape`` is metadata, not a view: the mutation of h stays an fx rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        width = h.shape[1]
        h.relu_()
        return self.b(h) * width


@pytest.mark.parametrize(
    ("factory", "trainable"),
    # ReadBefore and InplaceModules change tensors autograd saved: eager backward fails too.
    [(Discarded, True), (ReadBefore, False), (InplaceModules, False), (ReadsShape, True)],
)
def test_every_split_of_an_inplace_graph_matches_eager(
    factory: type[nn.Module], trainable: bool
) -> None:
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = model(x.clone())
    gm = trace(model, (x,), mode="fx")
    compute = [n.name for n in gm.graph.nodes if n.op in COMPUTE]
    # Every way to cut the node order into 3 runs: the planner may pick any of them.
    reference = copy.deepcopy(model)
    if trainable:
        reference(x.clone()).pow(2).sum().backward()
    for a, b in itertools.combinations(range(1, len(compute)), 2):
        assignment = {name: (k >= a) + (k >= b) for k, name in enumerate(compute)}
        stages = split(gm, plan_for(gm, assignment))
        with torch.no_grad():
            out = run_stages(stages, x.clone())
        torch.testing.assert_close(out, want, msg=f"cuts {a}, {b}")
        if not trainable:
            continue
        # The pipelined backward hands a stage that mutates its input a private copy.
        gm.zero_grad(set_to_none=True)
        pipe = Pipeline(stages, ["cpu"] * len(stages), chunks=2, backward="pipelined")
        pipe(x.clone()).pow(2).sum().backward()
        for (name, p), r in zip(gm.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, r.grad, msg=f"{name}, cuts {a}, {b}")


def test_rewrite_rewires_later_readers_and_clones_for_earlier_ones() -> None:
    gm = torch.fx.symbolic_trace(ReadBefore())
    assert functionalize_inplace(gm) == 2  # mul_ (with a clone), then add_
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_method"]
    assert ops == ["clone", "mul_", "add_"]
    mul = next(n for n in gm.graph.nodes if n.target == "mul_")
    add = next(n for n in gm.graph.nodes if n.target == "add_")
    assert add.args[0] is mul  # reads the mutated tensor through the mutation
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert add in out.all_input_nodes[0].all_input_nodes  # before + (h after both)
    torch.testing.assert_close(gm(torch.ones(2, 8)), ReadBefore.forward(gm, torch.ones(2, 8)))


def test_safe_inplace_modules_need_no_rewrite() -> None:
    assert functionalize_inplace(torch.fx.symbolic_trace(InplaceModules())) == 0


@pytest.mark.parametrize(
    ("factory", "why"),
    [
        (MutatesView, "shares memory.*mode='export'"),
        (CountsCalls, "changes buffer.*mode='export'"),
        (AssignsInto, "item assignment"),  # torch.fx itself refuses x[...] = v on a Proxy
    ],
)
def test_observable_mutations_go_to_export(factory: type[nn.Module], why: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    with pytest.raises(TraceError, match=f"fx: TypeError: .*{why}"):
        trace(factory(), (x,), mode="fx")
    model = factory()
    reference = copy.deepcopy(model)
    gm = trace(model, (x,))  # auto: fx refuses, export functionalizes
    assert gm.meta["modelsplit_mode"] == "export"
    torch.testing.assert_close(gm(x), reference(x))


@pytest.mark.parametrize("backward", ["autograd", "pipelined"])
def test_model_splitter_trains_an_inplace_model(backward: str) -> None:
    torch.manual_seed(0)
    model = Discarded()
    reference = copy.deepcopy(model)
    x = torch.randn(12, 8)
    splitter = ModelSplitter(model, num_devices=3, chunks=4, backward=backward, time_limit=5)
    out = splitter(x)
    want = reference(x)
    torch.testing.assert_close(out, want)
    out.pow(2).mean().backward()
    want.pow(2).mean().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_out_arguments_are_refused_by_fx() -> None:
    # (eager autograd refuses out= on tensors that require grad too, so export cannot help)
    with pytest.raises(TraceError, match="fx: TypeError: .*through out=.*mode='export'"):
        trace(WritesOut(), (torch.randn(4, 8),), mode="fx")


# -- issue 15.2: export graphs, aliases, and the stage-input scan -------------------


class _WritesThroughSlice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h[:, :4] += 1
        h.relu_()
        return self.b(h)


def test_export_graphs_get_their_mutations_as_data_flow() -> None:
    torch.manual_seed(0)
    model = _WritesThroughSlice()
    x = torch.randn(4, 8)
    gm = trace(model, (x,), mode="export")
    # h[:, :4] += 1 is one node now, which the relu_ that follows reads
    fused = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len(fused) == 2  # add_ and copy_ (export writes the slice back)
    relu = next(n for n in gm.graph.nodes if "relu_" in str(n.target))
    assert relu.args[0] is fused[-1]
    assert mutation_hazards(gm) == []
    torch.testing.assert_close(gm(x), model(x))


def test_fx_reads_through_identity_and_clones_for_the_earlier_reader() -> None:
    gm = torch.fx.symbolic_trace(SideReader())
    assert len(mutation_hazards(gm)) == 1  # side reads h, which relu_ changes through identity
    assert functionalize_inplace(gm) == 1
    act = next(n for n in gm.graph.nodes if n.target == "act")
    assert act.args[0].target == "clone"  # side keeps the h it read in eager mode
    assert not any(n.target == "identity" for n in gm.graph.nodes)
    assert mutation_hazards(gm) == []


def test_split_refuses_a_graph_whose_mutation_crosses_stages() -> None:
    # A graph partitioner.trace did not make: only the node order says side reads h first.
    gm = torch.fx.symbolic_trace(SideReader())
    names = [n.name for n in gm.graph.nodes if n.op in COMPUTE]
    assert names == ["a", "side", "identity", "act", "main", "add"]
    crossing = dict(zip(names, [0, 1, 0, 0, 0, 1], strict=True))
    with pytest.raises(PlanError, match="in-place node 'act' changes a tensor.*partitioner.trace"):
        split(gm, plan_for(gm, crossing))
    together = dict(zip(names, [0, 0, 0, 0, 1, 1], strict=True))
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(run_stages(split(gm, plan_for(gm, together)), x), gm(x))


def _export_stage(body: Any) -> torch.fx.GraphModule:
    class Stage(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return body(x, y)  # type: ignore[no-any-return]

    args = (torch.randn(2, 4), torch.randn(2, 4))
    return torch.export.export(Stage(), args, strict=False).module()


@pytest.mark.parametrize(
    ("body", "want"),
    [
        (lambda x, y: x.relu_() + y, {0}),  # aten.relu_.default: its schema writes self
        (lambda x, y: x.add_(y), {0}),
        (lambda x, y: y[:, :2].mul_(2).sum() + x, {1}),  # through a view
        (lambda x, y: x + y, set()),
    ],
)
def test_stage_input_scan_reads_aten_schemas(body: Any, want: set[int]) -> None:
    assert mutated_inputs(_export_stage(body)) == want


def test_stage_input_scan_follows_aliases() -> None:
    class Stage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop_path = nn.Identity()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.act(self.drop_path(x)) + y.view(-1).sum()

    assert mutated_inputs(torch.fx.symbolic_trace(Stage())) == {0}


def test_observed_write_through_a_maybe_view_is_a_clear_error() -> None:
    class Reshapes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            flat = h.reshape(-1)  # a view or a copy, as the strides have it
            h.relu_()
            return flat.sum() + h

    with pytest.raises(TraceError, match="may or may not share memory"):
        trace(Reshapes(), (torch.randn(4, 8),), mode="export")
