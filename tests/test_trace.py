"""trace: capture modes, the Program attached to the result, and its errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from partitioner.capture.binding import input_signature, program_of, run_program
from partitioner.capture.tracer import trace
from partitioner.errors import TraceError
from partitioner.examples import MODELS, SMALL, Gate, small
from runtime.interface import Const, Program

TRACEABLE = [name for name in SMALL if name != "data_dependent"]


def run_by_node(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``gm`` node by node, keep every value, rebuild the output from the program."""
    program = program_of(gm)
    values = program.bind(args, kwargs)
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    interp.run(*(values[name] for name in program.inputs), enable_io_processing=False)
    env = {node.name: value for node, value in interp.env.items()}
    leaves = [
        leaf.value if isinstance(leaf, Const) else env[leaf] for leaf in program.output_leaves
    ]
    return program.unflatten(leaves)


def assert_same(actual: Any, expected: Any) -> None:
    got, got_spec = pytree.tree_flatten(actual)
    want, want_spec = pytree.tree_flatten(expected)
    assert got_spec == want_spec
    assert type(actual) is type(expected)
    for g, w in zip(got, want, strict=True):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w)
        else:
            assert g == w


@pytest.mark.parametrize("name", TRACEABLE)
def test_trace_reproduces_outputs_at_another_batch_size(name: str) -> None:
    model, args, kwargs = small(name, batch=4)
    gm = trace(model, args, kwargs)
    assert gm.meta["modelsplit_mode"] == ("export" if name == "shape_dependent" else "fx")
    assert set(gm.state_dict()) == set(model.state_dict())
    _, args3, kwargs3 = small(name, batch=3, seed=1)
    with torch.no_grad():
        expected = model(*args3, **kwargs3)
        assert_same(run_by_node(gm, args3, kwargs3), expected)
        assert_same(run_program(gm, args3, kwargs3), expected)
        # export graphs take the model's call; fx graphs take their tensor inputs by name
        if gm.meta["modelsplit_mode"] == "export":
            assert_same(gm(*args3, **kwargs3), expected)
        else:
            assert_same(gm(**program_of(gm).bind(args3, kwargs3)), expected)


@pytest.mark.parametrize("name", ["mlp", "gpt", "two_input_dict", "residual_cnn"])
def test_export_mode_matches_fx_mode(name: str) -> None:
    model, args, kwargs = small(name, batch=4)
    by_fx = trace(model, args, kwargs, mode="fx")
    by_export = trace(model, args, kwargs, mode="export")
    assert by_export.meta["modelsplit_mode"] == "export"
    assert set(by_export.state_dict()) == set(model.state_dict())
    _, args5, kwargs5 = small(name, batch=5, seed=2)
    with torch.no_grad():
        assert_same(run_by_node(by_export, args5, kwargs5), run_by_node(by_fx, args5, kwargs5))


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_two_inputs_keyword_and_dict_output(mode: str) -> None:
    model, (x, y), kwargs = small("two_input_dict", batch=4)
    gm = trace(model, (x, y), kwargs, mode=mode)
    program = program_of(gm)
    assert isinstance(program, Program)
    assert program.inputs[:2] == ("x", "y") and len(program.output_leaves) == 2
    out = run_by_node(gm, (x[:2], y[:2]), {"bias": kwargs["bias"][:2], "scale": 0.5})
    assert isinstance(out, dict) and list(out) == ["out", "gate"]
    with torch.no_grad():
        assert_same(out, model(x[:2], y[:2], **{**kwargs, "bias": kwargs["bias"][:2]}))
    with pytest.raises(ValueError, match="scale"):
        program.bind((x, y), {**kwargs, "scale": 2.0})


def test_export_binds_keywords_given_positionally() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.lin(x) * mask

    model = Pair()
    x, mask = torch.randn(4, 4), torch.rand(4, 4)
    gm = trace(model, (x,), {"mask": mask}, mode="export")
    program = program_of(gm)
    assert program.bind((x,), {"mask": mask}).keys() == program.bind((x, mask), {}).keys()
    assert_same(run_program(gm, (x, mask), {}), model(x, mask))
    with pytest.raises(TypeError):
        program.bind((x,), {"nope": mask})


def test_tuple_list_constant_and_none_outputs() -> None:
    class Many(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> Any:
            h = self.lin(x)
            return h, [h.relu(), 3], None, {"n": h.sum()}

    model = Many()
    x = torch.randn(4, 4)
    for mode in ("fx", "export"):
        gm = trace(model, (x,), mode=mode)
        program = program_of(gm)
        assert Const(3) in program.output_leaves
        with torch.no_grad():
            assert_same(run_by_node(gm, (x[:3],), {}), model(x[:3]))


def test_data_dependent_control_flow_names_causes_and_remedy() -> None:
    model, args, _ = small("data_dependent")
    with pytest.raises(TraceError) as info:
        trace(model, args)
    message = str(info.value)
    assert "DataDependent" in message
    assert "fx:" in message and "export:" in message
    assert "leaf_modules" in message
    for leaves in ([Gate], ["gate"]):
        gm = trace(model, args, leaf_modules=leaves)
        assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
        assert_same(run_program(gm, args, {}), model(*args))


def test_mismatch_is_a_trace_error() -> None:
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x * self.calls

    with pytest.raises(TraceError, match="differs"):
        trace(Counter(), (torch.randn(4, 4),), mode="fx")


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        trace(nn.Linear(2, 2), (torch.randn(2, 2),), mode="jit")


def test_state_dict_names_survive_fx_quirks() -> None:
    class Quirky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x) * self.scale

    model = Quirky()
    gm = trace(model, (torch.randn(4, 4),), mode="fx")
    assert set(gm.state_dict()) == set(model.state_dict())
    gm.load_state_dict(model.state_dict())


def test_train_mode_dropout_and_batchnorm_have_no_side_effects() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 8)
    state = torch.get_rng_state()
    gm = trace(model, (x,))
    assert gm.meta["modelsplit_training"] is True
    assert torch.equal(torch.get_rng_state(), state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_tied_weights_stay_tied() -> None:
    model, args, _ = small("gpt")
    for mode in ("fx", "export"):
        gm = trace(model, args, mode=mode)
        assert set(gm.state_dict()) == set(model.state_dict())
        assert gm.get_parameter("head.weight") is gm.get_parameter("tok.weight")


def test_meta_device_model_traces_with_export() -> None:
    with torch.device("meta"):
        model = MODELS["gpt"](**SMALL["gpt"])
    ids = torch.randint(0, 64, (4, 16))
    gm = trace(model, (ids,), mode="export")
    assert all(p.is_meta for p in gm.parameters())
    assert set(gm.state_dict()) == set(model.state_dict())


def test_signature_is_json_and_recorded() -> None:
    model, args, kwargs = small("two_input_dict", batch=4)
    gm = trace(model, args, kwargs)
    signature = gm.meta["modelsplit_signature"]
    assert signature == input_signature(args, kwargs)
    assert json.loads(json.dumps(signature)) == signature
    assert signature[0] == {"path": "args[0]", "shape": [4, 16], "dtype": "float32"}
    assert {"path": "kwargs['scale']", "value": "0.5"} in signature
    assert input_signature(args, kwargs) != input_signature(*small("two_input_dict", 5)[1:])


def test_program_of_untraced_module() -> None:
    with pytest.raises(TypeError, match="trace"):
        program_of(fx.symbolic_trace(nn.Linear(2, 2)))


class _NoGradInside(nn.Module):
    """A gate computed under torch.no_grad(): fx drops the context, export keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            gate = self.a(x).mean(dim=1, keepdim=True)
        return self.b(x) * gate


def test_fx_that_would_train_other_parameters_goes_to_export() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    with pytest.raises(TraceError, match=r"gradient of 'a.weight' differs.*torch.no_grad\(\)"):
        trace(_NoGradInside(), (x,), mode="fx")
    model = _NoGradInside()
    gm = trace(model, (x,))
    assert gm.meta["modelsplit_mode"] == "export"
    gm(x).pow(2).mean().backward()
    assert model.a.weight.grad is None and model.b.weight.grad is not None


class _BranchesOnValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return h * 2 if h.sum() > 0 else h


def test_failed_export_prints_no_graph_dump(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TraceError, match="export: GuardOnDataDependentSymNode"):
        trace(_BranchesOnValues(), (torch.randn(8, 4),))
    err = capfd.readouterr().err
    assert "def forward" not in err and "Unable to find user code" not in err


def test_batch_size_dependent_control_flow_names_the_cause() -> None:
    class BySize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * 2 if x.shape[0] > 4 else self.lin(x)

    with pytest.raises(
        TraceError, match=r"matches the model at the example's 8 rows but not at 2"
    ):
        trace(BySize(), (torch.randn(8, 8),), mode="export")


def test_fx_control_flow_error_names_the_submodule_to_keep_whole() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(32, 32)
            self.block = nn.Sequential(nn.Linear(32, 32), Gate(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(self.inp(x))

    model, x = Wrapped(), torch.randn(4, 32)
    with pytest.raises(
        TraceError, match=r"in submodule 'block.1' \(Gate\).*leaf_modules=\['block.1'\]"
    ):
        trace(model, (x,), mode="fx")
    gm = trace(model, (x,), mode="fx", leaf_modules=["block.1"])  # the advice works
    torch.testing.assert_close(run_program(gm, (x,), {}), model(x))


def test_eval_mode_fx_graph_without_the_no_grad_block_refuses_backward() -> None:
    # Eval mode is planned for inference, where the fx graph is right; but eval mode is also
    # how many fine-tune (no dropout): gradients through that graph would be silently wrong.
    from partitioner import ModelSplitter

    torch.manual_seed(0)
    x = torch.randn(6, 8)
    model = _NoGradInside().eval()
    gm = trace(model, (x,))  # auto: export keeps the block, and is taken
    assert gm.meta["modelsplit_mode"] == "export"
    fx_only = trace(model, (x,), mode="fx")  # fx alone: kept for inference, marked
    assert "a backward through it raises" in fx_only.meta["modelsplit_gradients_off"]
    splitter = ModelSplitter(model, devices=["cpu:0", "cpu:1"], trace_mode="fx")
    out = splitter(x)
    torch.testing.assert_close(out, model(x))  # inference is right
    with pytest.raises(TraceError, match="fx graph is kept for inference only"):
        out.pow(2).mean().backward()
    with torch.no_grad():
        torch.testing.assert_close(splitter(x), model(x))
