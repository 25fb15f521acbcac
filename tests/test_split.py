"""split(gm, plan): stage interface, parameter ownership, skips, ties, outputs and gradients."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partitioner.errors import PlanError
from partitioner.planner.plan import Plan, make_plan
from partitioner.splitting.compose import run_stages, shared_tensors, stage_summary
from partitioner.splitting.cut import program_from_graph, split
from runtime.interface import Const, stage_io

COMPUTE = ("call_function", "call_method", "call_module")


# -- helpers -------------------------------------------------------------------


def cost_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """A zero-cost CostGraph of gm: every fx node but the output, an edge per read."""
    g = nx.DiGraph()
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "output":
            continue
        g.add_node(
            node.name, time=0.0, param_bytes=0, out_bytes=0, act_bytes=0, op=node.op, order=i
        )
        for u in node.all_input_nodes:
            g.add_edge(u.name, node.name)
    return g


def plan_for(gm: torch.fx.GraphModule, assignment: Mapping[str, int]) -> Plan:
    """A Plan from a partial assignment of compute nodes; inputs and attrs go with readers."""
    full = dict(assignment)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            readers = [full[u.name] for u in node.users if u.op != "output"]
            full[node.name] = min(readers, default=0)
    k = max(full.values()) + 1
    return make_plan(cost_graph(gm), full, k, lower_bound=0.0, status="baseline", solver="test")


def even_plan(gm: torch.fx.GraphModule, k: int) -> Plan:
    """Compute nodes in graph order, cut into k runs of about equal length."""
    compute = [n.name for n in gm.graph.nodes if n.op in COMPUTE]
    return plan_for(gm, {name: i * k // len(compute) for i, name in enumerate(compute)})


def export(model: nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    dims = tuple({0: torch.export.Dim.AUTO} for _ in args)
    return torch.export.export(model, args, strict=False, dynamic_shapes=dims).module()


def used_names(stage: torch.fx.GraphModule) -> set[str]:
    """Qualified names of the params and buffers a stage's own nodes reference."""
    names: set[str] = set()
    for node in stage.graph.nodes:
        if node.op == "call_module":
            sub = stage.get_submodule(node.target)
            names |= {f"{node.target}.{n}" for n, _ in sub.named_parameters()}
            names |= {f"{node.target}.{n}" for n, _ in sub.named_buffers()}
        elif node.op == "get_attr" and isinstance(attr(stage, node.target), torch.Tensor):
            names.add(node.target)
    return names


def attr(module: nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), module)


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


def check_ownership(gm: torch.fx.GraphModule, stages: list[torch.fx.GraphModule]) -> None:
    """Each stage holds exactly what its nodes use, as gm's own objects, by original name."""
    for stage in stages:
        held = tensors(stage)
        assert set(held) == used_names(stage)
        for name, t in held.items():
            assert attr(gm, name) is t, name


def assert_close(a: Any, b: Any) -> None:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y)
        else:
            assert x == y


def check_grads(model: nn.Module, gm: torch.fx.GraphModule, stages: list, *args: Any) -> None:
    """Gradients through run_stages on gm's params equal the unsplit model's (a deep copy)."""
    ref = copy.deepcopy(model)
    loss_of: Callable[[Any], torch.Tensor] = lambda out: sum(
        (t.float() ** 2).sum()
        for t in torch.utils._pytree.tree_leaves(out)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    )
    gm.zero_grad(set_to_none=True)
    loss_of(run_stages(stages, *args)).backward()
    loss_of(ref(*args)).backward()
    grads = {n: p.grad for n, p in gm.named_parameters()}
    for name, p in ref.named_parameters():
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], p.grad, msg=name)


# -- models --------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        skip = torch.sigmoid(h)
        g = torch.relu(self.b(h))
        return self.c(g) + skip


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(self.emb(ids)))
        return F.linear(h, self.emb.weight)


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = nn.Linear(8, 8), nn.Linear(8, 3)
        self.register_buffer("shift", torch.arange(8.0))

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> dict[str, Any]:
        h = self.f(x) + self.shift
        return {"y": self.g(h) * scale, "parts": [h, x.size(0)], "tag": None}


# -- tests: torch.fx.symbolic_trace ----------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mlp_symbolic(k: int) -> None:
    model = mlp()
    gm = torch.fx.symbolic_trace(model)
    stages = split(gm, even_plan(gm, k))
    assert len(stages) == k
    x = torch.randn(5, 16)
    assert_close(run_stages(stages, x), model(x))
    check_ownership(gm, stages)
    owned = [set(tensors(s)) for s in stages]
    assert set().union(*owned) == set(tensors(gm))
    assert sum(map(len, owned)) == len(tensors(gm))  # no tensor on two stages
    check_grads(model, gm, stages, torch.randn(3, 16))


def test_stage_interface() -> None:
    gm = torch.fx.symbolic_trace(mlp())
    stages = split(gm, even_plan(gm, 2))
    first, second = (stage_io(s) for s in stages)
    assert first.stage == 0 and second.stage == 1
    assert first.inputs == tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    assert first.outputs == second.inputs and len(first.outputs) == 1
    assert first.program is second.program
    values = stages[0](torch.randn(2, 16))
    assert isinstance(values, tuple) and len(values) == 1
    for stage in stages:
        assert type(stage.graph._codegen) is torch.fx.graph.CodeGen
    original = {n.name: n for n in gm.graph.nodes}
    for stage in stages:
        for node in stage.graph.nodes:
            if node.op in COMPUTE:
                assert node.meta == original[node.name].meta
                assert node.target == original[node.name].target
    assert "stage 1:" in stage_summary(stages)


def test_skip_value_goes_straight_to_its_consumer() -> None:
    model = Residual()
    gm = torch.fx.symbolic_trace(model)
    plan = plan_for(gm, {"a": 0, "sigmoid": 0, "b": 1, "relu": 1, "c": 2, "add": 2})
    s0, s1, s2 = (stage_io(s) for s in split(gm, plan))
    assert s0.outputs == ("a", "sigmoid")
    assert s1.inputs == ("a",) and s1.outputs == ("relu",)
    assert s2.inputs == ("sigmoid", "relu")
    stages = split(gm, plan)
    x = torch.randn(4, 8)
    assert_close(run_stages(stages, x), model(x))
    check_grads(model, gm, stages, x)


def test_tied_weight_shared_across_stages() -> None:
    model = Tied()
    gm = torch.fx.symbolic_trace(model)
    stages = split(gm, plan_for(gm, {"emb": 0, "mid": 1, "tanh": 1, "linear": 1}))
    weight = gm.get_parameter("emb.weight")
    assert stages[0].get_parameter("emb.weight") is weight
    assert stages[1].get_parameter("emb.weight") is weight
    assert not hasattr(stages[0], "mid")  # only the stage that calls it holds it
    (tie,) = shared_tensors(stages)
    assert tie.stages == (0, 1) and tie.names == ("emb.weight", "emb.weight")
    assert tie.is_parameter and tie.numel == weight.numel()
    ids = torch.randint(0, 20, (3, 5))
    assert_close(run_stages(stages, ids), model(ids))
    check_grads(model, gm, stages, ids)  # on one device both uses add into one .grad


def test_dict_output_and_defaults_symbolic() -> None:
    model = DictOut()
    gm = torch.fx.symbolic_trace(model)
    stages = split(gm, even_plan(gm, 2))
    x = torch.randn(6, 8)
    out = run_stages(stages, x)
    assert type(out) is dict and type(out["parts"]) is list and out["tag"] is None
    assert_close(out, model(x))
    assert_close(run_stages(stages, x, scale=3.0), model(x, scale=3.0))
    assert_close(run_stages(stages, x=x, scale=0.5), model(x, 0.5))
    holders = [s for s in stages if "shift" in dict(s.named_buffers())]
    assert len(holders) == 1 and holders[0].get_buffer("shift") is gm.get_buffer("shift")


def test_program_from_graph() -> None:
    gm = torch.fx.symbolic_trace(DictOut())
    program = program_from_graph(gm)
    assert program.inputs == ("x", "scale")
    assert program.bind((1,), {}) == {"x": 1, "scale": 2.0}
    assert Const(None) in program.output_leaves
    with pytest.raises(TypeError):
        program.bind((1, 2, 3), {})


def test_program_attached_by_trace_is_used() -> None:
    gm = torch.fx.symbolic_trace(mlp())
    gm.meta["modelsplit_program"] = program = program_from_graph(gm)
    assert all(stage_io(s).program is program for s in split(gm, even_plan(gm, 2)))


# -- tests: mismatched plans -----------------------------------------------------


def test_plan_for_another_model_is_rejected() -> None:
    gm = torch.fx.symbolic_trace(mlp())
    other = even_plan(torch.fx.symbolic_trace(Residual()), 2)
    with pytest.raises(PlanError, match="does not have"):
        split(gm, other)


def test_plan_missing_a_node_is_rejected() -> None:
    gm = torch.fx.symbolic_trace(mlp())
    plan = even_plan(gm, 2)
    del plan.assignment[next(iter(gm.graph.nodes)).name]
    with pytest.raises(PlanError, match="does not place"):
        split(gm, plan)


def test_backwards_plan_is_rejected() -> None:
    gm = torch.fx.symbolic_trace(Residual())
    plan = plan_for(gm, {"a": 0, "sigmoid": 0, "b": 1, "relu": 1, "c": 1, "add": 1})
    plan.assignment["a"] = 1
    plan.assignment["b"] = 0
    with pytest.raises(PlanError, match="backwards"):
        split(gm, plan)


def test_stage_out_of_range_is_rejected() -> None:
    gm = torch.fx.symbolic_trace(Residual())
    plan = plan_for(gm, {"a": 0, "sigmoid": 0, "b": 0, "relu": 0, "c": 1, "add": 1})
    plan.assignment["add"] = 2
    with pytest.raises(PlanError, match="outside 0..1"):
        split(gm, plan)


# -- tests: torch.export -------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_mlp_export_any_batch(k: int) -> None:
    model = mlp()
    gm = export(model, torch.randn(4, 16))
    stages = split(gm, even_plan(gm, k))
    for batch in (4, 1, 7):
        x = torch.randn(batch, 16)
        assert_close(run_stages(stages, x), model(x))
    check_ownership(gm, stages)
    assert not shared_tensors(stages)
    check_grads(model, gm, stages, torch.randn(5, 16))


def test_tied_weight_export() -> None:
    model = Tied()
    ids = torch.randint(0, 20, (3, 5))
    gm = export(model, ids)
    stages = split(gm, even_plan(gm, 2))
    (tie,) = shared_tensors(stages)
    assert tie.stages == (0, 1)
    for name, j in zip(tie.names, tie.stages, strict=True):
        assert stages[j].get_parameter(name) is model.emb.weight
    assert_close(run_stages(stages, ids[:2]), model(ids[:2]))
    check_grads(model, gm, stages, ids)


def test_dict_output_export() -> None:
    model = DictOut()
    gm = export(model, torch.randn(4, 8))
    stages = split(gm, even_plan(gm, 2))
    x = torch.randn(9, 8)
    out = run_stages(stages, x)
    assert type(out) is dict
    assert_close(out, model(x))


class Stateful(nn.Module):
    """Buffers, a lifted constant, a factory call and train-mode BatchNorm (mutated buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.out = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x) * self.scale + torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8])
        h = h + torch.arange(8, device=x.device)
        return self.out(torch.relu(self.bn(h)))


def test_buffers_constants_and_mutation_export() -> None:
    model = Stateful()
    reference = copy.deepcopy(model)
    gm = export(copy.deepcopy(model), torch.randn(4, 8))
    constants = [n for n in gm.graph.nodes if n.op == "get_attr" and "lifted" in n.target]
    assert constants  # the tensor literal became an attribute of the exported module
    stages = split(gm, even_plan(gm, 3))
    check_ownership(gm, stages)
    x = torch.randn(6, 8)
    assert_close(run_stages(stages, x), reference(x))
    # train-mode BatchNorm updated its running stats in place, as the model did
    torch.testing.assert_close(gm.get_buffer("bn.running_mean"), reference.bn.running_mean)
    assert int(gm.get_buffer("bn.num_batches_tracked")) == 1


# -- tests: a tiny GPT-2 ----------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2() -> tuple[nn.Module, torch.fx.GraphModule]:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, use_cache=False
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    return model, export(model, torch.randint(0, 100, (4, 7)))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_gpt2_export(gpt2: tuple[nn.Module, torch.fx.GraphModule], k: int) -> None:
    model, gm = gpt2
    stages = split(gm, even_plan(gm, k))
    assert len(stages) == k
    for batch in (4, 1, 3):
        ids = torch.randint(0, 100, (batch, 7))
        out, ref = run_stages(stages, ids), model(ids)
        assert type(out) is type(ref)
        torch.testing.assert_close(out.logits, ref.logits)
    check_ownership(gm, stages)
    name = "transformer.h.1.mlp.c_fc.weight"
    holders = [s for s in stages if name in dict(s.named_parameters())]
    assert len(holders) == 1 and holders[0].get_parameter(name) is gm.get_parameter(name)
    tied = shared_tensors(stages)
    assert [t.names for t in tied] == [("lm_head.weight", "lm_head.weight")]
    assert tied[0].stages == (0, k - 1)


def test_gpt2_gradients(gpt2: tuple[nn.Module, torch.fx.GraphModule]) -> None:
    model, gm = gpt2
    stages = split(gm, even_plan(gm, 3))
    ids = torch.randint(0, 100, (2, 7))
    ref = copy.deepcopy(model)
    gm.zero_grad(set_to_none=True)
    run_stages(stages, ids).logits.square().sum().backward()
    ref(ids).logits.square().sum().backward()
    grads = {n: p.grad for n, p in gm.named_parameters()}
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


# -- tests: partitioner.capture.tracer, kwargs, odd outputs, devices ----------------------


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_traced_module_keeps_its_program(mode: str) -> None:
    from partitioner.capture.tracer import trace

    model = DictOut()
    gm = trace(model, (torch.randn(4, 8),), mode=mode)
    stages = split(gm, even_plan(gm, 2))
    assert stage_io(stages[0]).program is gm.meta["modelsplit_program"]
    x = torch.randn(3, 8)
    assert_close(run_stages(stages, x), model(x))


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.f(x))
        if mask is not None:
            h = h * mask
        return self.g(h)


def test_export_with_keyword_inputs() -> None:
    model = Masked()
    x, mask = torch.randn(4, 8), (torch.rand(4, 8) > 0.5).float()
    batch = {0: torch.export.Dim.AUTO}
    ep = torch.export.export(
        model, (x,), {"mask": mask}, strict=False, dynamic_shapes={"x": batch, "mask": batch}
    )
    gm = ep.module()
    stages = split(gm, even_plan(gm, 2))
    assert stage_io(stages[0]).program.inputs == ("x", "mask")
    assert_close(run_stages(stages, x[:3], mask=mask[:3]), model(x[:3], mask=mask[:3]))
    assert_close(run_stages(stages, x[:2], mask[:2]), model(x[:2], mask[:2]))


class ReturnsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.lin(x), self.lin.bias, x


def test_attribute_and_input_returned_as_outputs() -> None:
    model = ReturnsWeight()
    gm = torch.fx.symbolic_trace(model)
    plan = plan_for(gm, {"lin": 1})
    plan.assignment["lin_bias"] = 0
    stages = split(gm, plan)
    assert stage_io(stages[0]).outputs == ("lin_bias",)
    assert stage_io(stages[1]).outputs == ("lin",)
    x = torch.randn(2, 4)
    y, bias, same = run_stages(stages, x)
    assert bias is model.lin.bias and same is x
    torch.testing.assert_close(y, model.lin(x))


def test_retarget_rewrites_burnt_in_devices() -> None:
    from partitioner.splitting.retarget import retarget

    model = Stateful().eval()
    gm = export(model, torch.randn(4, 8))
    stages = [s.to("meta") for s in split(gm, even_plan(gm, 2))]
    before = {n.name: dict(n.kwargs) for n in gm.graph.nodes}
    burnt = [n for s in stages for n in s.graph.nodes if "device" in n.kwargs]
    assert burnt and all(n.kwargs["device"] == torch.device("cpu") for n in burnt)
    for stage in stages:
        retarget(stage, "meta")
    assert all(n.kwargs["device"] == torch.device("meta") for n in burnt)
    out = run_stages(stages, torch.randn(3, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 2)
    assert {n.name: dict(n.kwargs) for n in gm.graph.nodes} == before  # gm untouched


class Extra(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"out": self.g(torch.relu(self.f(x)) + extra["a"]) * extra["b"]}


def test_symbolic_trace_with_pytree_concrete_args() -> None:
    model = Extra()
    gm = torch.fx.symbolic_trace(
        model, concrete_args={"extra": {"a": torch.fx.PH, "b": torch.fx.PH}}
    )
    stages = split(gm, even_plan(gm, 2))
    x, extra = torch.randn(3, 4), {"a": torch.randn(3, 4), "b": torch.randn(3, 4)}
    assert_close(run_stages(stages, x, extra), model(x, extra))
    assert_close(run_stages(stages, x=x, extra=extra), model(x, extra))


# -- tests: the whole pass chain ---------------------------------------------------


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_trace_profile_solve_split(mode: str) -> None:
    """Plans from the real profile and solver split and run like the model."""
    from partitioner.capture.tracer import trace
    from partitioner.planner.solver import solve
    from partitioner.profiling.costgraph import profile

    model = nn.Sequential(*(m for _ in range(4) for m in (nn.Linear(32, 32), nn.GELU())))
    x = torch.randn(8, 32)
    gm = trace(model, (x,), mode=mode)
    graph = profile(gm, (x,), cost="flops")
    plan = solve(graph, 3, bandwidth=1e18, time_limit=10.0)  # free transfers: 3 stages
    stages = split(gm, plan)
    assert len(stages) == plan.num_stages >= 2
    check_ownership(gm, stages)
    assert_close(run_stages(stages, x[:5]), model(x[:5]))
    check_grads(model, gm, stages, x[:3])


class NoGrad(nn.Module):
    """torch.export puts the no_grad region in a submodule run by a higher-order op."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.f(x)
        with torch.no_grad():
            mask = (h > 0).float() + torch.arange(8, device=x.device)
        return self.g(h * mask)


def test_higher_order_op_bodies_split_and_retarget() -> None:
    from partitioner.splitting.retarget import retarget

    model = NoGrad()
    gm = export(model, torch.randn(4, 8))
    bodies = [n.target for n in gm.graph.nodes if n.op == "get_attr" and "submod" in n.target]
    assert bodies
    stages = split(gm, even_plan(gm, 2))
    x = torch.randn(3, 8)
    assert_close(run_stages(stages, x), model(x))
    check_grads(model, gm, stages, x)
    holder = next(s for s in stages if hasattr(s, bodies[0]))
    retarget(holder.to("meta"), "meta")
    body = getattr(holder, bodies[0])
    assert body is not getattr(gm, bodies[0])  # gm keeps its own body
    devices = {n.kwargs["device"] for n in body.graph.nodes if "device" in n.kwargs}
    assert devices == {torch.device("meta")}
    original = getattr(gm, bodies[0]).graph.nodes
    assert {n.kwargs["device"] for n in original if "device" in n.kwargs} == {torch.device("cpu")}


def test_tied_weight_read_through_a_copy_keeps_gradients() -> None:
    # [Note: tied weights across devices]: the later stage reads the tie through
    # tied_replica(weight, dev); on the CPU that is the weight itself, so outputs and
    # gradients must be unchanged.
    from partitioner.splitting.retarget import read_through_copy
    from runtime.replica import tied_replica

    model = Tied()
    ids = torch.randint(0, 20, (3, 5))
    gm = export(model, ids)
    stages = split(gm, even_plan(gm, 2))
    (tie,) = shared_tensors(stages)
    later = stages[tie.stages[1]]
    read_through_copy(later, {tie.names[1]}, "cpu")
    copies = [n for n in later.graph.nodes if n.target is tied_replica]
    assert len(copies) == 1 and copies[0].args[0].target == tie.names[1]
    assert_close(run_stages(stages, ids), model(ids))
    check_grads(model, gm, stages, ids)


def test_tied_weight_inside_a_called_module_cannot_be_copied() -> None:
    from partitioner.splitting.retarget import read_through_copy

    model = Tied()
    gm = torch.fx.symbolic_trace(model)
    stages = split(gm, plan_for(gm, {"emb": 0, "mid": 1, "tanh": 1, "linear": 1}))
    names = {n for n, _ in stages[1].named_parameters() if n.endswith("weight")}
    with pytest.raises(NotImplementedError, match="mode='export'"):
        read_through_copy(stages[1], names | {"emb.weight"}, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tied_weight_across_cpu_and_cuda_trains_like_the_unsplit_model() -> None:
    from partitioner.splitting.retarget import place

    model = Tied()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 20, (3, 5))
    gm = export(model, ids)
    stages = split(gm, even_plan(gm, 2))
    place(stages, ["cuda:0", "cpu:1"])
    from runtime import Pipeline

    out = Pipeline(stages, ["cuda:0", "cpu"], chunks=2)(ids)  # moves activations between
    assert_close(out.cpu(), reference(ids))
    out.float().pow(2).mean().backward()
    reference(ids).float().pow(2).mean().backward()
    torch.testing.assert_close(model.emb.weight.grad.cpu(), reference.emb.weight.grad)
