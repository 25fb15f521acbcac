"""Pipeline.train_step: every schedule's gradients and loss against the unsplit model, the
memory each schedule keeps alive, errors, timeouts and threads ([Note: training step])."""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime import Pipeline, StageError
from runtime.checks import check_schedule_option
from runtime.interface import Const, Program, StageIO
from runtime.recovery.faults import StageTimeout
from runtime.schedule import actions
from tests.test_pipeline import S0  # its first stage: x -> (a, tanh(a), width)

# (schedule, devices K, micro-batches M, virtual stages V, batch): M not a multiple of K
# wherever torch's schedule allows it, and batches that do not split evenly.
CASES = [
    ("gpipe", 1, 3, 1, 7),
    ("gpipe", 3, 5, 1, 10),
    ("gpipe", 2, 4, 1, 9),
    ("1f1b", 2, 3, 1, 7),
    ("1f1b", 3, 3, 1, 6),
    ("1f1b", 3, 5, 1, 11),
    ("interleaved-1f1b", 2, 4, 2, 8),
    ("interleaved-1f1b", 2, 3, 2, 7),
    ("interleaved-1f1b", 3, 6, 2, 13),
    ("zero-bubble", 2, 3, 1, 7),
    ("zero-bubble", 3, 4, 1, 9),
    ("zero-bubble", 2, 4, 2, 8),
]
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 1)]


def _blocks(n: int, width: int = 8) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n)])


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _assert_same_grads(model: nn.Module, reference: nn.Module) -> None:
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def _unsplit(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor], target: Any, *args: Any
) -> tuple[nn.Module, torch.Tensor]:
    """A copy of ``model`` after ``loss_fn(model(*args), target).backward()``, and the loss."""
    reference = copy.deepcopy(model)
    loss = loss_fn(reference(*args), target)
    loss.backward()
    return reference, loss.detach()


@pytest.fixture(params=["workers", "caller"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both scheduling loops ([Note: worker-driven steps]): the workers' own (CPU), and the
    caller's (what CUDA pipelines run), forced here on CPU."""
    import runtime.training

    if request.param == "caller":
        monkeypatch.setattr(runtime.training, "worker_driven", lambda pipe: False)
    return str(request.param)


@pytest.mark.parametrize(("schedule", "k", "m", "v", "batch"), CASES)
def test_mlp_matches_the_unsplit_model(
    schedule: str, k: int, m: int, v: int, batch: int, loop: str
) -> None:
    model = _blocks(k * v)
    x = torch.randn(batch, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    target = torch.randn(batch, 8)
    reference, want = _unsplit(model, F.mse_loss, target, xr)
    ran_on: dict[int, set[str]] = {}
    for s, block in enumerate(model):
        block.register_forward_pre_hook(
            lambda _m, _a, s=s: ran_on.setdefault(s, set()).add(threading.current_thread().name)
        )
    pipe = Pipeline(list(model), ["cpu"] * (k * v), chunks=m, schedule=schedule, virtual_stages=v)
    before = threading.active_count()
    loss = pipe.train_step(x, target=target, loss_fn=F.mse_loss)
    assert threading.active_count() == before
    torch.testing.assert_close(loss, want)
    assert not loss.requires_grad
    _assert_same_grads(model, reference)
    torch.testing.assert_close(x.grad, xr.grad)  # the caller's input gets its gradient too
    # Each device's worker ran that device's actions in the schedule's order...
    record = pipe.last_step
    assert record is not None and len(record.sizes) == m
    assert record.order == [[str(a) for a in ops] for ops in actions(schedule, k, m, v)]
    # ...and stage s ran on the worker of device s % K.
    assert ran_on == {s: {f"modelsplit-train-device{s % k}-cpu"} for s in range(k * v)}


def test_gradients_add_to_existing_grad_and_sum_reduction() -> None:
    model = _blocks(2)
    x, target = torch.randn(6, 8), torch.randn(6, 8)

    def sum_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (out - t).pow(2).sum()

    reference, want = _unsplit(model, sum_loss, target, x)
    reference(x).sum().backward()  # a second backward adds to .grad
    model(x).sum().backward()
    pipe = Pipeline(list(model), ["cpu"] * 2, chunks=4, schedule="1f1b")
    loss = pipe.train_step(x, target=target, loss_fn=sum_loss, loss_reduction="sum")
    torch.testing.assert_close(loss, want)
    _assert_same_grads(model, reference)


# -- split stages: skip connections, values read by several stages, dict outputs ----------


class _S1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, t: torch.Tensor, width: int) -> tuple[torch.Tensor]:
        return (torch.tanh(self.lin(t)) * width,)


class _S2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.lin(u) * t,)  # t: read by stages 1 and 2, and a model output


class _S3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, w: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.lin(w + a),)  # a skips stages 1 and 2


class _Whole(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s0, self.s1, self.s2, self.s3 = S0(), _S1(), _S2(), _S3()

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> dict[str, Any]:
        a, t, width = self.s0(x, bias)
        (u,) = self.s1(t, width)
        (w,) = self.s2(u, t)
        (y,) = self.s3(w, a)
        return {"y": y, "t": t, "const": 7}


def _stageio_split(model: _Whole) -> list[torch.fx.GraphModule]:
    program = Program(
        inputs=("x", "bias"),
        output_leaves=("y", "t", Const(7)),
        bind=lambda args, kwargs: {"x": args[0], "bias": kwargs["bias"]},
        unflatten=lambda leaves: {"y": leaves[0], "t": leaves[1], "const": leaves[2]},
    )
    ios = [
        StageIO(0, ("x", "bias"), ("a", "t", "width"), program),
        StageIO(1, ("t", "width"), ("u",), program),
        StageIO(2, ("u", "t"), ("w",), program),
        StageIO(3, ("w", "a"), ("y",), program),
    ]
    stages = []
    for module, io in zip((model.s0, model.s1, model.s2, model.s3), ios, strict=True):
        gm = torch.fx.GraphModule(module, torch.fx.symbolic_trace(module).graph)
        gm.meta["modelsplit"] = io
        stages.append(gm)
    return stages


def _dict_loss(out: dict[str, Any], target: torch.Tensor) -> torch.Tensor:
    assert out["const"] == 7
    return F.mse_loss(out["y"], target) + out["t"].pow(2).mean()


@pytest.mark.parametrize(("schedule", "v"), [*SCHEDULES, ("zero-bubble", 2)])
def test_skip_connections_and_dict_output(schedule: str, v: int) -> None:
    model = _Whole()
    x, bias, target = torch.randn(9, 4), torch.tensor(0.5, requires_grad=True), torch.randn(9, 2)
    br = bias.detach().clone().requires_grad_()
    reference, want = _unsplit(model, _dict_loss, target, x, br)
    stages = _stageio_split(model)
    pipe = Pipeline(stages, ["cpu"] * 4, chunks=4, schedule=schedule, virtual_stages=v)
    loss = pipe.train_step(x, bias=bias, target=target, loss_fn=_dict_loss)
    torch.testing.assert_close(loss, want)
    _assert_same_grads(model, reference)
    # a 0-dim input goes to every micro-batch: its gradient sums over all of them
    torch.testing.assert_close(bias.grad, br.grad)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 16)
        self.c, self.d = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.a(x))
        u = torch.tanh(self.b(h))
        return {"y": self.d(torch.tanh(self.c(u)) + h), "h": h}


def _traced_split(model: nn.Module, x: torch.Tensor, where: dict[str, int]) -> list[Any]:
    """``partitioner.split`` of the traced model with the stage of each node given."""
    from partitioner import trace
    from partitioner.planner.plan import make_plan
    from partitioner.splitting.cut import split

    gm = trace(model, (x,))
    graph = nx.DiGraph()
    for order, node in enumerate(gm.graph.nodes):
        if node.op != "output":
            graph.add_node(
                node.name, time=0.0, param_bytes=0, out_bytes=0, act_bytes=0, order=order
            )
            graph.add_edges_from((u.name, node.name) for u in node.all_input_nodes)
    plan = make_plan(
        graph, where, 1 + max(where.values()), lower_bound=0.0, status="test", solver="test"
    )
    return split(gm, plan)


@pytest.mark.parametrize(("schedule", "v"), SCHEDULES)
def test_traced_split_with_a_skip_connection(schedule: str, v: int) -> None:
    model, x, target = _Net(), torch.randn(8, 8), torch.randn(8, 4)

    def loss_fn(out: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out["y"], t) + out["h"].pow(2).mean()

    reference, want = _unsplit(model, loss_fn, target, x)
    where = {"x": 0, "a": 0, "tanh": 0, "b": 1, "tanh_1": 1, "c": 2, "tanh_2": 2}
    stages = _traced_split(model, x, {**where, "add": 3, "d": 3})
    # h (node "tanh") is made by stage 0 and read by stage 3, skipping two stages
    assert [s.meta["modelsplit"].inputs for s in stages][3] == ("tanh", "tanh_2")
    pipe = Pipeline(stages, ["cpu"] * 4, chunks=4, schedule=schedule, virtual_stages=v)
    torch.testing.assert_close(pipe.train_step(x, target=target, loss_fn=loss_fn), want)
    _assert_same_grads(model, reference)


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.a(x), torch.tanh(self.b(x if y is None else y))


class _Chain(nn.Sequential):
    """Plain stages as the pipeline runs them: a tuple output is splatted into the next."""

    def forward(self, x: Any) -> Any:
        for module in self:
            x = module(*x) if isinstance(x, tuple) else module(x)
        return x


@pytest.mark.parametrize(("schedule", "v"), SCHEDULES)
def test_tuple_output_of_plain_stages(schedule: str, v: int) -> None:
    model = _Chain(_Pair(), _Pair(), _Pair(), _Pair())
    x, target = torch.randn(7, 6), torch.randn(7, 6)

    def loss_fn(out: tuple[torch.Tensor, ...], t: torch.Tensor) -> torch.Tensor:
        assert isinstance(out, tuple) and len(out) == 2
        return F.mse_loss(out[0], t)  # out[1] feeds no loss: model[3].b gets no gradient

    reference, want = _unsplit(model, loss_fn, target, x)
    pipe = Pipeline(list(model), ["cpu"] * 4, chunks=4, schedule=schedule, virtual_stages=v)
    torch.testing.assert_close(pipe.train_step(x, target=target, loss_fn=loss_fn), want)
    _assert_same_grads(model, reference)
    assert model[3].b.weight.grad is None


# -- memory --------------------------------------------------------------------------


class _Meter:
    """Live bytes of the activations autograd saves for backward, per stage: what the
    stage's ``saved_tensors_hooks`` packed and autograd has not released yet."""

    def __init__(self, n: int, params: Sequence[torch.Tensor]) -> None:
        self.lock = threading.Lock()
        self.live, self.peak, self.total = [0] * n, [0] * n, [0] * n
        self.weights = {p.untyped_storage().data_ptr() for p in params}

    def pack(self, s: int) -> Callable[[torch.Tensor], Any]:
        def pack(t: torch.Tensor) -> Any:
            if t.untyped_storage().data_ptr() in self.weights:
                return t  # a parameter: alive whatever the schedule
            return _Saved(self, s, t)

        return pack

    @staticmethod
    def unpack(held: Any) -> torch.Tensor:
        return held.tensor if isinstance(held, _Saved) else held


class _Saved:
    def __init__(self, meter: _Meter, s: int, tensor: torch.Tensor) -> None:
        self.meter, self.s, self.tensor = meter, s, tensor
        self.nbytes = tensor.numel() * tensor.element_size()
        with meter.lock:
            meter.live[s] += self.nbytes
            meter.total[s] += self.nbytes
            meter.peak[s] = max(meter.peak[s], meter.live[s])

    def __del__(self) -> None:
        with self.meter.lock:
            self.meter.live[self.s] -= self.nbytes


class _Metered(nn.Module):
    def __init__(self, inner: nn.Module, meter: _Meter, s: int) -> None:
        super().__init__()
        self.inner, self.meter, self.s = inner, meter, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autograd.graph.saved_tensors_hooks(self.meter.pack(self.s), self.meter.unpack):
            return self.inner(x)  # type: ignore[no-any-return]


def _alive(schedule: str, k: int, m: int, v: int) -> list[int]:
    """Brute force over the schedule: the most micro-batches alive on each stage, from its
    forward until its backward (its weight-grad in zero-bubble), walking each device's list."""
    peak = [0] * (k * v)
    for ops in actions(schedule, k, m, v):
        alive = [0] * (k * v)
        frees = "W" if any(a.kind == "W" for a in ops) else "B"
        for a in ops:
            alive[a.stage] += {"F": 1, frees: -1}.get(a.kind, 0)
            peak[a.stage] = max(peak[a.stage], alive[a.stage])
    return peak


@pytest.mark.parametrize(
    ("schedule", "k", "m", "v"),
    [
        ("gpipe", 3, 6, 1),
        ("1f1b", 3, 6, 1),
        ("zero-bubble", 3, 6, 1),
        ("interleaved-1f1b", 2, 4, 2),
    ],
)
def test_saved_activations_follow_the_schedule(schedule: str, k: int, m: int, v: int) -> None:
    model = _blocks(k * v, width=32)
    meter = _Meter(k * v, list(model.parameters()))
    stages = [_Metered(block, meter, s) for s, block in enumerate(model)]
    pipe = Pipeline(stages, ["cpu"] * (k * v), chunks=m, schedule=schedule, virtual_stages=v)
    pipe.train_step(torch.randn(2 * m, 32), target=torch.randn(2 * m, 32), loss_fn=F.mse_loss)
    assert meter.live == [0] * (k * v)  # every saved tensor released by the step's end
    unit = [total // m for total in meter.total]  # bytes one micro-batch saves per stage
    counts = [peak / u for peak, u in zip(meter.peak, unit, strict=True)]
    assert counts == _alive(schedule, k, m, v)
    if schedule == "gpipe":
        assert counts == [m] * k
    if schedule == "1f1b":
        assert counts == [min(m, k - j) for j in range(k)]  # [3, 2, 1]


# -- errors, timeouts, threads ----------------------------------------------------------


class _Fail(nn.Module):
    def __init__(self, on: int, where: str = "forward") -> None:
        super().__init__()
        self.lin, self.on, self.where, self.calls = nn.Linear(4, 4), on, where, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, at = self.lin(x), self.calls
        self.calls += 1
        if at == self.on and self.where == "forward":
            raise ValueError("bad value")
        if at == self.on:
            y.register_hook(lambda g: (_ for _ in ()).throw(ValueError("bad gradient")))
        return y


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize(("schedule", "v"), SCHEDULES)
def test_stage_error_names_stage_and_microbatch(schedule: str, v: int, where: str) -> None:
    torch.manual_seed(0)
    stages = [nn.Linear(4, 4), _Fail(on=2, where=where), nn.Linear(4, 4), nn.Linear(4, 4)]
    pipe = Pipeline(stages, ["cpu"] * 4, chunks=4, schedule=schedule, virtual_stages=v)
    before = threading.active_count()
    with pytest.raises(StageError, match="stage 1 on cpu failed on micro-batch 2") as info:
        pipe.train_step(torch.randn(8, 4), target=torch.randn(8, 4), loss_fn=F.mse_loss)
    assert isinstance(info.value.original, ValueError) and info.value.__cause__ is not None
    assert f"bad {'value' if where == 'forward' else 'gradient'}" in str(info.value)
    assert threading.active_count() == before
    assert all(p.grad is None for s in stages for p in s.parameters())  # .grad untouched


class _Stalls(nn.Module):
    """Blocks in micro-batch ``at``'s forward or backward until ``release`` (or 10 s)."""

    def __init__(self, at: int, where: str) -> None:
        super().__init__()
        self.lin, self.at, self.where, self.calls = nn.Linear(8, 8), at, where, 0
        self.release = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, at = self.lin(x), self.calls
        self.calls += 1
        if at == self.at and self.where == "forward":
            self.release.wait(10)
        elif at == self.at:
            y.register_hook(lambda g: (self.release.wait(10), g)[1])
        return y


@pytest.mark.parametrize(("schedule", "where"), [("1f1b", "backward"), ("zero-bubble", "forward")])
def test_a_stall_hits_stage_timeout(schedule: str, where: str, loop: str) -> None:
    stalls = _Stalls(at=1, where=where)
    stages = [nn.Linear(8, 8), stalls, nn.Linear(8, 2)]
    before = threading.active_count()
    pipe = Pipeline(stages, ["cpu"] * 3, chunks=3, stage_timeout=0.5, schedule=schedule)
    start = time.monotonic()
    try:
        with pytest.raises(StageError, match="stage 1 on cpu failed on micro-batch 1") as info:
            pipe.train_step(torch.randn(6, 8), target=torch.randn(6, 2), loss_fn=F.mse_loss)
        assert time.monotonic() - start < 5
        assert isinstance(info.value.original, StageTimeout)
        assert f"within 0.5s in {where} (1{where[0].upper()}1)" in str(info.value)
    finally:
        stalls.release.set()
    deadline = time.monotonic() + 10  # the stalled worker skips what is queued and stops
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before


def test_bad_arguments_say_what_to_do() -> None:
    stages = list(_blocks(3))

    def step(pipe: Pipeline, batch: int = 6, **kwargs: Any) -> torch.Tensor:
        x = torch.randn(batch, 8)
        return pipe.train_step(x, target=torch.randn(batch, 8), loss_fn=F.mse_loss, **kwargs)

    with pytest.raises(ValueError, match="unknown schedule 'pipedream'"):
        Pipeline(stages, ["cpu"] * 3, chunks=2, schedule="pipedream")
    with pytest.raises(ValueError, match="3 stages are not 2 virtual stages per device"):
        Pipeline(stages, ["cpu"] * 3, chunks=2, schedule="interleaved-1f1b", virtual_stages=2)
    with pytest.raises(ValueError, match="1f1b runs one stage per device"):
        step(Pipeline(stages[:2], ["cpu"] * 2, chunks=2), schedule="1f1b", virtual_stages=2)
    with pytest.raises(ValueError, match="1f1b needs chunks >= num_devices"):
        step(Pipeline(stages, ["cpu"] * 3, chunks=2, schedule="1f1b"))
    with pytest.raises(ValueError, match="1f1b needs chunks >= num_devices"):
        step(Pipeline(stages, ["cpu"] * 3, chunks=8, schedule="1f1b"), batch=2)  # 2 rows
    four = list(_blocks(4))
    with pytest.raises(ValueError, match="needs chunks to be a multiple of"):
        step(Pipeline(four, ["cpu"] * 4, chunks=5, schedule="interleaved-1f1b", virtual_stages=2))
    pipe = Pipeline(stages, ["cpu"] * 3, chunks=3)
    with pytest.raises(ValueError, match="loss_reduction must be 'mean', 'sum' or a callable"):
        step(pipe, loss_reduction="none")
    with pytest.raises(StageError, match="stage 2 .* loss_fn must return a scalar tensor"):
        pipe.train_step(torch.randn(6, 8), target=torch.randn(6, 8), loss_fn=lambda o, t: o - t)
    with pytest.raises(ValueError, match="different batch sizes"):
        pipe.train_step(torch.randn(6, 8), target=torch.randn(5, 8), loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="on_failure='replan'"):
        step(Pipeline(stages, ["cpu"] * 3, chunks=3, on_failure="replan"))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        step(pipe)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    with pytest.raises(ValueError, match="stage 2 is on meta but stage 0 on cpu"):
        check_schedule_option("interleaved-1f1b", 2, [cpu, meta, meta, cpu])
    assert check_schedule_option("interleaved-1f1b", 2, [cpu, meta, cpu, meta]) == 2


# -- checkpointing, random ops, batch norm -----------------------------------------------


@pytest.mark.parametrize("checkpoint", ["always", "except_last"])
@pytest.mark.parametrize(("schedule", "v"), SCHEDULES)
def test_checkpointed_stages_match_the_unsplit_model(
    schedule: str, v: int, checkpoint: str
) -> None:
    model = _blocks(4)
    x, target = torch.randn(8, 8), torch.randn(8, 8)
    reference, want = _unsplit(model, F.mse_loss, target, x)
    pipe = Pipeline(
        list(model),
        ["cpu"] * 4,
        chunks=4,
        checkpoint=checkpoint,
        schedule=schedule,
        virtual_stages=v,
    )
    torch.testing.assert_close(pipe.train_step(x, target=target, loss_fn=F.mse_loss), want)
    _assert_same_grads(model, reference)


@pytest.mark.parametrize("schedule", ["1f1b", "zero-bubble"])
def test_recomputation_draws_the_dropout_masks_of_the_forward(schedule: str) -> None:
    # Two stages draw from the CPU generator; each recomputed mask must be its forward's
    # ([Note: random ops and recomputation]): with checkpoint="always" every mask shows
    # up once in the forward and once when backward recomputes it, and once more in
    # zero-bubble, whose weight-grad recomputes the checkpointed stage again (stage 0, whose
    # input needs no gradient, has nothing to recompute for in its input-grad half).
    logs: list[list[tuple[bool, ...]]] = [[], []]

    def stage(log: list[tuple[bool, ...]]) -> nn.Module:
        drop = nn.Dropout(0.5)
        drop.register_forward_hook(lambda m, i, o: log.append(tuple((o[0] == 0).tolist())))
        return nn.Sequential(nn.Linear(64, 64), drop, nn.Linear(64, 64))

    stages = [stage(log) for log in logs]
    pipe = Pipeline(stages, ["cpu"] * 2, chunks=4, checkpoint="always", schedule=schedule)
    pipe.train_step(torch.randn(16, 64), target=torch.randn(16, 64), loss_fn=F.mse_loss)
    for j, log in enumerate(logs):
        times = 3 if schedule == "zero-bubble" and j > 0 else 2
        assert len(log) == 4 * times and set(Counter(log).values()) == {times}


@pytest.mark.parametrize("deferred", [False, True])
def test_batch_norm_statistics_as_in_a_pipeline_call(deferred: bool) -> None:
    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4))

    x, target = torch.randn(12, 4), torch.randn(12, 4)
    called, stepped = model(), model()
    pipe = Pipeline([called[:2], called[2:]], ["cpu"] * 2, chunks=3, deferred_batch_norm=deferred)
    F.mse_loss(pipe(x), target).backward()
    pipe = Pipeline(
        [stepped[:2], stepped[2:]], ["cpu"] * 2, chunks=3, deferred_batch_norm=deferred
    )
    pipe.train_step(x, target=target, loss_fn=F.mse_loss, schedule="1f1b")
    bn, want = stepped[1], called[1]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(want, name), msg=name)
    _assert_same_grads(stepped, called)
    if deferred:  # the first BatchNorm's statistics are the whole batch's
        torch.testing.assert_close(bn.running_mean, 0.1 * stepped[0](x).mean(0))


# -- ModelSplitter ----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["1f1b", "zero-bubble", "interleaved-1f1b", "auto", None])
def test_model_splitter_train_step(schedule: str | None) -> None:
    from partitioner import ModelSplitter

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    x, target = torch.randn(8, 8), torch.randn(8, 4)
    reference, want = _unsplit(model, F.mse_loss, target, x)
    splitter = ModelSplitter(model, devices=["cpu:0", "cpu:1"], chunks=4, schedule=schedule)
    loss = splitter.train_step(x, target=target, loss_fn=F.mse_loss)
    # "auto" and None run the plan's schedule; None plans GPipe or 1F1B, one stage per device
    assert splitter.pipeline.schedule == (
        splitter.plan.schedule if schedule in (None, "auto") else schedule
    )
    if schedule is None:
        assert splitter.plan.schedule in ("gpipe", "1f1b") and splitter.plan.virtual_stages == 1
    assert splitter.devices == ["cpu:0", "cpu:1"]  # each device once, with virtual stages too
    torch.testing.assert_close(loss, want)
    _assert_same_grads(model, reference)


def test_model_splitter_refuses_an_unknown_schedule_before_tracing() -> None:
    from partitioner import ModelSplitter

    with pytest.raises(ValueError, match=r"schedule must be None .* \(got '1F1B'\)"):
        ModelSplitter(nn.Linear(2, 2), devices=["cpu:0", "cpu:1"], schedule="1F1B")


class _TokenLM(nn.Module):
    """A tiny token model: (B, L) ids -> (B, L, V) logits, two stages."""

    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(width, vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_count_makes_a_token_mean_with_ignored_labels_exact(schedule: str) -> None:
    lm = _TokenLM()
    stages = [lm.embed, lm.head]
    ids = torch.randint(0, 11, (6, 5))
    labels = torch.randint(0, 11, (6, 5))
    labels[0, 1:] = -100  # micro-batches of 2 rows hold 2, 10 and 10 counted tokens
    labels[1, :4] = -100
    reference = copy.deepcopy(lm)
    want = _token_loss(reference.head(reference.embed(ids)), labels)
    want.backward()
    count = lambda t: (t != -100).sum()  # noqa: E731
    pipe = Pipeline(stages, ["cpu"] * 2, chunks=3, schedule=schedule)
    loss = pipe.train_step(ids, target=labels, loss_fn=_token_loss, loss_reduction=count)
    torch.testing.assert_close(loss, want.detach())
    _assert_same_grads(lm, reference)
    # the same step weighted by rows is not the full batch's: the test can fail
    for p in lm.parameters():
        p.grad = None
    by_rows = pipe.train_step(ids, target=labels, loss_fn=_token_loss)
    assert abs(by_rows.item() - want.item()) > 1e-3
    # a micro-batch whose labels are all ignored: its mean is 0/0, said, not averaged in
    labels[:2] = -100
    with pytest.raises(ValueError, match="micro-batch 0 of 3 has 0 items"):
        pipe.train_step(ids, target=labels, loss_fn=_token_loss, loss_reduction=count)
    with pytest.raises(ValueError, match="count failed on micro-batch 0 of 3"):
        pipe.train_step(ids, target=labels, loss_fn=_token_loss, loss_reduction=lambda t: t.x)


def test_model_splitter_train_step_takes_loss_reduction() -> None:
    # It was passed on to the model as one of its keywords: a TraceError.
    from partitioner import ModelSplitter

    torch.manual_seed(0)
    lm = _TokenLM().train()
    ids, labels = torch.randint(0, 11, (8, 5)), torch.randint(0, 11, (8, 5))
    labels[:2, 1:] = -100
    reference = copy.deepcopy(lm)
    want = _token_loss(reference(ids), labels)
    want.backward()
    splitter = ModelSplitter(lm, devices=["cpu:0", "cpu:1"], chunks=4, schedule="1f1b")
    count = lambda t: (t != -100).sum()  # noqa: E731
    loss = splitter.train_step(ids, target=labels, loss_fn=_token_loss, loss_reduction=count)
    torch.testing.assert_close(loss, want.detach())
    _assert_same_grads(lm, reference)


def test_a_schedule_that_deadlocks_is_an_error_not_a_hang(monkeypatch, loop: str) -> None:  # type: ignore[no-untyped-def]
    import runtime.training
    from partitioner.planner.schedules import Action

    # device 0 starts with the backward of a micro-batch it has not run forward
    bad = [
        [Action(0, "B", 0), Action(0, "F", 0)],
        [Action(1, "F", 0), Action(1, "B", 0)],
    ]
    monkeypatch.setattr(runtime.training._schedule, "actions", lambda *a: bad)
    pipe = Pipeline(list(_blocks(2)), ["cpu"] * 2, chunks=1, schedule="gpipe")
    before = threading.active_count()
    with pytest.raises((StageError, RuntimeError), match="the schedule deadlocks"):
        pipe.train_step(torch.randn(2, 8), target=torch.randn(2, 8), loss_fn=F.mse_loss)
    assert threading.active_count() == before


def test_a_failing_stage_stops_the_step_in_both_loops(loop: str) -> None:
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("broken stage")

    pipe = Pipeline([nn.Linear(8, 8), Fails()], ["cpu"] * 2, chunks=4, schedule="1f1b")
    before = threading.active_count()
    with pytest.raises(StageError, match="stage 1 on cpu failed on micro-batch 0: .*broken stage"):
        pipe.train_step(torch.randn(8, 8), target=torch.randn(8, 8), loss_fn=F.mse_loss)
    assert threading.active_count() == before
