"""ModelSplitter and auto_partition: the seed example, transparency, plans and weights."""

from __future__ import annotations

import threading

import pytest
import torch

from partitioner import ModelSplitter, PlanError, auto_partition, trace
from partitioner.devices import resolve_devices
from partitioner.examples import MyModel, small
from runtime import inject_failure


def test_seed_example_verbatim_then_batch_37() -> None:
    model = MyModel()
    splitter = ModelSplitter(model, num_devices=4)
    input_data = torch.randn(100, 64)
    output = splitter.forward(input_data)

    torch.testing.assert_close(output, model(input_data))
    plan = splitter.plan
    assert plan is not None and 1 <= plan.num_stages <= 4
    x = torch.randn(37, 64)
    torch.testing.assert_close(splitter(x), model(x))
    assert splitter.plan is plan  # another batch size reuses the plan


def test_parameters_and_state_dict_are_the_models() -> None:
    model, args, _ = small("gpt")
    splitter = ModelSplitter(model, num_devices=3, example_inputs=args, time_limit=5)
    assert list(splitter.state_dict()) == list(model.state_dict())
    assert [id(p) for p in splitter.parameters()] == [id(p) for p in model.parameters()]
    staged = {id(p) for stage in splitter.stages for p in stage.parameters()}
    assert staged == {id(p) for p in model.parameters()}
    # A checkpoint of the model loads into the splitter and changes what it computes.
    other, _, _ = small("gpt")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    splitter.load_state_dict(other.state_dict())
    torch.testing.assert_close(splitter(*args), other(*args))


@pytest.mark.parametrize(("name", "devices", "chunks"), [("gpt", 2, 3), ("two_input_dict", 3, 2)])
def test_training_gradients_equal_unsplit(name: str, devices: int, chunks: int) -> None:
    model, args, kwargs = small(name, batch=6)
    reference, _, _ = small(name, batch=6)
    reference.load_state_dict(model.state_dict())
    splitter = ModelSplitter(model, num_devices=devices, chunks=chunks, time_limit=5)

    def loss_of(out: object) -> torch.Tensor:
        if isinstance(out, dict):
            return sum(v.float().pow(2).mean() for v in out.values())  # type: ignore[return-value]
        return out.float().pow(2).mean()  # type: ignore[union-attr]

    loss_of(splitter(*args, **kwargs)).backward()
    loss_of(reference(*args, **kwargs)).backward()
    for (name_a, a), (name_b, b) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert name_a == name_b
        torch.testing.assert_close(a.grad, b.grad, msg=name_a)


def test_optimizer_on_splitter_trains_the_split_model() -> None:
    model, args, _ = small("mlp", batch=8)
    splitter = ModelSplitter(model, num_devices=2, chunks=2, time_limit=5)
    opt = torch.optim.SGD(splitter.parameters(), lr=0.1)
    before = splitter(*args).pow(2).mean()
    before.backward()
    opt.step()
    after = splitter(*args).pow(2).mean()
    assert after.item() < before.item()
    torch.testing.assert_close(splitter(*args), model(*args))


def test_new_input_structure_is_planned_and_cached() -> None:
    model, args, _ = small("gpt", batch=4)
    splitter = ModelSplitter(model, num_devices=2, time_limit=5)
    splitter(*args)
    first = splitter.plan
    longer = torch.randint(0, 64, (4, 24))
    torch.testing.assert_close(splitter(longer), model(longer))
    assert splitter.plan is not first
    splitter(*args)
    assert splitter.plan is first


def test_from_plan_reuses_a_saved_plan(tmp_path) -> None:
    model, args, _ = small("my_model", batch=8)
    plan = auto_partition(model, args, num_devices=3, chunks=2, time_limit=5)
    path = tmp_path / "plan.json"
    plan.save(path)
    splitter = ModelSplitter.from_plan(model, str(path))
    torch.testing.assert_close(splitter(*args), model(*args))
    assert splitter.plan is not None
    assert splitter.plan.assignment == plan.assignment
    assert splitter.devices == plan.devices


def test_from_plan_of_another_model_is_a_clear_error() -> None:
    model, args, _ = small("my_model", batch=8)
    plan = auto_partition(model, args, num_devices=2, time_limit=5)
    other, other_args, _ = small("mlp", batch=8)
    splitter = ModelSplitter.from_plan(other, plan)
    with pytest.raises(PlanError, match="does not have|does not place"):
        splitter(*other_args)


def test_auto_partition_pipelines_a_training_step_by_default() -> None:
    # one micro-batch would leave every stage of a training step waiting for the others
    model, args, _ = small("mlp", batch=8)
    plan = auto_partition(model.train(), args, num_devices=2, time_limit=5)
    assert plan.schedule is not None and plan.chunks == 4
    assert auto_partition(model.eval(), args, num_devices=2, time_limit=5).chunks == 1


def test_memory_limits_reach_the_plan() -> None:
    model, args, _ = small("mlp", batch=8)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = auto_partition(model, args, num_devices=3, memory=f"{total // 2 + 2048}B")
    assert plan.num_stages >= 2
    assert all(s.memory <= total // 2 + 2048 for s in plan.stages)


def test_resolve_devices() -> None:
    assert [d.name for d in resolve_devices(3)] == ["cpu:0", "cpu:1", "cpu:2"]
    specs = resolve_devices(devices=["cpu", "cpu"], memory=["1GB", None], speed=[1, 2])
    assert [(d.name, d.memory, d.speed) for d in specs] == [
        ("cpu:0", 10**9, 1.0),
        ("cpu:1", None, 2.0),
    ]
    with pytest.raises(ValueError, match="positive integer"):
        resolve_devices(0)
    with pytest.raises(ValueError, match="one per device"):
        resolve_devices(2, memory=["1GB"])
    with pytest.raises(ValueError, match="unique"):
        resolve_devices(devices=["cuda:0", "cuda:0"])


def test_no_thread_outlives_a_call() -> None:
    model, args, _ = small("mlp", batch=8)
    splitter = ModelSplitter(model, num_devices=3, chunks=4, time_limit=5)
    splitter(*args)
    before = threading.active_count()
    for _ in range(3):
        splitter(*args)
    assert threading.active_count() == before


def test_package_names_stay_functions_after_submodule_imports() -> None:
    import partitioner.capture.tracer  # noqa: F401  (sets the submodule on the package)
    from partitioner import trace as fn

    assert callable(fn) and fn is trace


class WithLoss(torch.nn.Module):
    """Returns a per-row output and a scalar mean loss, like a Hugging Face model with labels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.b(torch.relu(self.a(x)))
        return {"out": out, "loss": (out - y).pow(2).mean()}


def test_scalar_loss_needs_a_reducer_and_mean_matches_the_full_batch() -> None:
    torch.manual_seed(0)
    model, reference = WithLoss(), WithLoss()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(10, 8), torch.randn(10, 4)
    with pytest.raises(ValueError, match="reducer"):
        ModelSplitter(model, num_devices=2, chunks=3, time_limit=5)(x, y)
    splitter = ModelSplitter(model, num_devices=2, chunks=3, reducer="mean", time_limit=5)
    got, want = splitter(x, y), reference(x, y)
    torch.testing.assert_close(got["loss"], want["loss"])
    got["loss"].backward()
    want["loss"].backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


class _Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.bn = torch.nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.bn(self.a(x)))


@pytest.mark.parametrize("trace_mode", ["fx", "export"])
def test_planning_leaves_batchnorm_statistics_and_the_rng_alone(trace_mode: str) -> None:
    # Tracing checks and profiling run the model several times; none of it may show.
    import copy

    model = _Normed().train()
    reference = copy.deepcopy(model)
    x = torch.randn(12, 8)
    torch.manual_seed(1)
    splitter = ModelSplitter(model, num_devices=3, chunks=1, trace_mode=trace_mode, time_limit=5)
    out = splitter(x)
    after = torch.rand(4)
    torch.manual_seed(1)
    want = reference(x)
    want_after = torch.rand(4)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(after, want_after)  # planning drew no random numbers
    for (name, got), want in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(got, want, msg=name)  # one forward's update, not seven


# -- errors a newcomer meets: one line, the problem and the fix ------------------------------


def test_wrong_input_shape_is_an_input_error_naming_the_planned_shapes(
    capfd: pytest.CaptureFixture[str],
) -> None:
    from partitioner.errors import InputError

    splitter = ModelSplitter(MyModel(), num_devices=2, example_inputs=(torch.randn(8, 64),))
    with pytest.raises(InputError) as info:
        splitter(torch.randn(8, 65))
    message = str(info.value)
    assert "(8, 65) float32" in message and "mat1 and mat2" in message
    assert "planned for (8, 64) float32" in message
    assert "leaf" not in message and "use_cache" not in message  # not a tracing remedy
    assert isinstance(info.value, ValueError)
    assert "fake_tensor" not in capfd.readouterr().err  # no traceback logged from export


def test_a_model_that_fails_on_its_inputs_is_not_a_trace_error() -> None:
    from partitioner.errors import InputError

    with pytest.raises(InputError, match=r"MyModel fails on the inputs \(4, 3\) float32"):
        trace(MyModel(), (torch.randn(4, 3),))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_devices_without_cuda_are_a_value_error_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"'cuda:0' does not exist here.*num_devices=2"):
        ModelSplitter(MyModel(), devices=["cuda:0", "cuda:1"])
    # planning for GPUs on a laptop stays possible
    plan = auto_partition(MyModel(), (torch.randn(8, 64),), devices=["cuda:0", "cuda:1"])
    assert plan.devices[0] == "cuda:0"


def test_memory_errors_are_in_human_units_with_a_fix() -> None:
    from partitioner import InfeasiblePlanError

    with pytest.raises(InfeasiblePlanError) as info:
        ModelSplitter(
            MyModel().eval(), num_devices=2, memory="100KB", example_inputs=(torch.randn(8, 64),)
        )
    message = str(info.value)
    assert "100 KB at most on one device" in message and " bytes" not in message
    assert "raise the memory limits" in message and "add devices" in message
    with pytest.raises(InfeasiblePlanError) as info:  # in training: the schedules' memory
        ModelSplitter(
            MyModel(), num_devices=2, memory="100KB", example_inputs=(torch.randn(8, 64),)
        )
    message = str(info.value)
    assert "over the 200 KB the devices offer" in message and " bytes" not in message
    assert 'ModelSplitter(checkpoint="always")' in message and "add devices" in message


def test_a_plan_from_solve_with_abstract_devices_runs_on_cpu_workers() -> None:
    from partitioner import profile, solve

    model, x = MyModel(), torch.randn(8, 64)
    gm = trace(model, (x,))
    plan = solve(profile(gm, (x,)), devices=2)  # devices named dev:0, dev:1
    splitter = ModelSplitter.from_plan(model, plan)
    torch.testing.assert_close(splitter(x), model(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_device_count_and_no_gpu_warns_that_nothing_is_split() -> None:
    with pytest.warns(UserWarning, match=r"one stage on cpu:0 \(nothing is split\)"):
        splitter = ModelSplitter(MyModel())
    assert splitter.devices == ["cpu:0"]


# -- one mode, the model's --------------------------------------------------------------------


class _FunctionalDropout(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.dropout(torch.relu(self.a(x)), 0.5, self.training)
        return self.b(h)


def test_the_splitter_and_the_model_share_one_mode() -> None:
    model = _FunctionalDropout().eval()
    x = torch.randn(8, 16)
    splitter = ModelSplitter(model, devices=["cpu:0", "cpu:1"], example_inputs=(x,))
    assert splitter.training is False  # the model's mode, not nn.Module's default
    splitter.train()
    assert model.training is True
    assert not torch.equal(splitter(x), splitter(x))  # the training graph: dropout
    splitter.eval()
    assert model.training is False
    torch.testing.assert_close(splitter(x), model(x))  # and no dropout in eval
    model.train()
    assert splitter.training is True


def test_a_mode_switch_reuses_the_plan_when_the_graph_is_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import partitioner.splitter as splitter_module

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.5), torch.nn.Tanh())
    x = torch.randn(8, 16)
    splitter = ModelSplitter(model, devices=["cpu:0", "cpu:1"], example_inputs=(x,))
    plan = splitter.plan
    calls: list[int] = []
    original = splitter_module.trace_profile_solve

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(splitter_module, "trace_profile_solve", counting)
    splitter.eval()
    torch.testing.assert_close(splitter(x), model(x))
    assert calls == [] and splitter.plan is plan  # traced anew, not profiled or solved


def test_a_drill_still_fires_after_a_mode_switch() -> None:
    model = _FunctionalDropout().eval()
    x = torch.randn(8, 16)
    splitter = ModelSplitter(
        model, devices=["cpu:0", "cpu:1"], on_failure="replan", example_inputs=(x,)
    )
    with inject_failure(splitter, stage=1, microbatch=0) as lost:
        splitter.train()  # a pipeline the drill was not armed on yet
        splitter(x)
    assert splitter.failed_devices == [lost]
    assert len(splitter.recoveries) == 1


def test_a_plan_that_left_a_device_unused_runs_on_the_list_it_was_made_from() -> None:
    model, x = MyModel().eval(), torch.randn(8, 64)  # in training, 1 micro-batch: 1 stage
    devices = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    plan = auto_partition(model, (x,), devices=["cpu:1", "cpu:3"])  # as if two were left
    assert plan.num_stages == 2
    splitter = ModelSplitter.from_plan(model, plan, devices=devices)  # the four offered
    torch.testing.assert_close(splitter(x), model(x))
    assert splitter.devices == ["cpu:1", "cpu:3"]  # kept by name
    other = ModelSplitter.from_plan(model, plan, devices=["cpu:5", "cpu:6", "cpu:7"])
    torch.testing.assert_close(other(x), model(x))
    assert other.devices == ["cpu:5", "cpu:6"]  # names not offered: the first ones
    with pytest.raises(PlanError, match="2 stages but 1 devices"):
        ModelSplitter.from_plan(model, plan, devices=devices[:1])
