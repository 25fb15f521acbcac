"""runtime.Pipeline: transparency, micro-batching, errors, threads, checkpointing, hooks."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import torch.fx
from torch import nn

from runtime import Pipeline, StageError
from runtime.interface import Const, Program, StageIO
from runtime.route import route_for, stageio_route

CPU = torch.device("cpu")


def mlp(width: int = 8, depth: int = 6) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_transparent(model: nn.Module, pipe: Pipeline, x: torch.Tensor) -> None:
    """Same output and same gradients as the unsplit model."""
    expected = model(x)
    expected.pow(2).mean().backward()
    expected_grads = grads(model)
    model.zero_grad()
    out = pipe(x)
    torch.testing.assert_close(out, expected)
    out.pow(2).mean().backward()
    for got, want in zip(grads(model), expected_grads, strict=True):
        torch.testing.assert_close(got, want)


# -- plain modules ---------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [1, 2, 3, 8])
@pytest.mark.parametrize("batch", [1, 5, 8])
def test_transparency_sequential(chunks: int, batch: int) -> None:
    model = mlp()
    stages = [model[:4], model[4:8], model[8:]]
    pipe = Pipeline(stages, ["cpu"] * 3, chunks=chunks)
    assert_transparent(model, pipe, torch.randn(batch, 8))
    assert pipe.last_run is not None
    assert pipe.last_run.chunks == min(chunks, batch)
    assert sorted(pipe.last_run.completed) == list(range(min(chunks, batch)))


class TwoOut(nn.Module):
    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
        return x * scale, x + 1


class TwoIn(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
        return {"sum": a + b, "pair": (a, b), "note": "ok"}


def test_tuple_is_splatted_kwargs_reach_stage0_and_structure_is_kept() -> None:
    x = torch.randn(6, 3)
    out = Pipeline([TwoOut(), TwoIn()], ["cpu", "cpu"], chunks=4)(x, scale=2.0)
    assert out["note"] == "ok"
    torch.testing.assert_close(out["sum"], 3 * x + 1)
    torch.testing.assert_close(out["pair"][1], x + 1)


class Loss(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).mean()


def test_scalar_output_needs_a_reducer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Loss())
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="no batch dimension.*reducer"):
        Pipeline([model[0], model[1]], ["cpu"] * 2, chunks=4)(x)
    loss = Pipeline([model[0], model[1]], ["cpu"] * 2, chunks=4, reducer="mean")(x)
    torch.testing.assert_close(loss, model(x))


def test_no_grad_and_modes_are_passed_to_workers() -> None:
    model = mlp()
    pipe = Pipeline([model[:6], model[6:]], ["cpu"] * 2, chunks=4)
    with torch.no_grad():
        assert pipe(torch.randn(4, 8)).grad_fn is None
    with torch.inference_mode():
        assert pipe(torch.randn(4, 8)).is_inference()
    assert pipe(torch.randn(4, 8)).grad_fn is not None


def test_pipeline_is_a_module_over_its_stages() -> None:
    model = mlp()
    pipe = Pipeline([model[:6], model[6:]], ["cpu", "cpu"], chunks=2)
    assert {id(p) for p in pipe.parameters()} == {id(p) for p in model.parameters()}
    assert "chunks=2" in repr(pipe)


# -- StageIO stages built by hand ------------------------------------------------------


class S0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[Any, ...]:
        a = self.lin(x) + bias
        return a, torch.tanh(a), x.size(1)


class S1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, t: torch.Tensor, width: int) -> tuple[torch.Tensor]:
        return (self.lin(t) * width,)


class S2(nn.Module):
    def forward(self, u: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor]:
        return (u + a,)  # a skips stage 1


class Whole(nn.Module):
    def __init__(self, s0: S0, s1: S1, s2: S2) -> None:
        super().__init__()
        self.s0, self.s1, self.s2 = s0, s1, s2

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> dict[str, Any]:
        a, t, w = self.s0(x, bias)
        (u,) = self.s1(t, w)
        (y,) = self.s2(u, a)
        return {"y": y, "t": t, "const": 7}


def stageio_split() -> tuple[Whole, list[torch.fx.GraphModule]]:
    s0, s1, s2 = S0(), S1(), S2()
    program = Program(
        inputs=("x", "bias", "unused"),
        output_leaves=("y", "t", Const(7)),
        bind=lambda args, kwargs: {"x": args[0], "bias": kwargs["bias"], "unused": 0},
        unflatten=lambda leaves: {"y": leaves[0], "t": leaves[1], "const": leaves[2]},
    )
    ios = [
        StageIO(0, ("x", "bias"), ("a", "t", "w"), program),
        StageIO(1, ("t", "w"), ("u",), program),
        StageIO(2, ("u", "a"), ("y",), program),
    ]
    stages = []
    for module, io in zip((s0, s1, s2), ios, strict=True):
        gm = torch.fx.symbolic_trace(module) if not isinstance(module, S0) else None
        if gm is None:  # x.size(1) is fine for fx too, but keep a plain module in the mix
            gm = torch.fx.GraphModule(module, torch.fx.symbolic_trace(module).graph)
        gm.meta["modelsplit"] = io
        stages.append(gm)
    return Whole(s0, s1, s2), stages


@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_transparency_stageio(chunks: int) -> None:
    model, stages = stageio_split()
    x, bias = torch.randn(7, 4), torch.tensor(0.5)  # 0-dim: broadcast
    expected = model(x, bias=bias)
    (expected["y"].sum() + expected["t"].pow(2).sum()).backward()
    want = grads(model)
    model.zero_grad()
    pipe = Pipeline(stages, ["cpu"] * 3, chunks=chunks)
    out = pipe(x, bias=bias)
    assert out["const"] == 7
    torch.testing.assert_close(out["y"], expected["y"])
    torch.testing.assert_close(out["t"], expected["t"])
    (out["y"].sum() + out["t"].pow(2).sum()).backward()
    for got, exp in zip(grads(model), want, strict=True):
        torch.testing.assert_close(got, exp)


def test_route_frees_values_after_their_last_reader() -> None:
    _, stages = stageio_split()
    route = route_for(stages)
    free = route.free_after()
    assert free[0] == ("unused",)  # never read: dropped right after binding
    assert set(free[1]) == {"x", "bias"}
    assert set(free[2]) == {"w", "u"} - {"u"}  # w read last by stage 1; t is an output
    assert set(free[3]) == {"a", "u"}
    assert route.producer["a"] == 0 and route.producer["x"] == -1


def test_stageio_and_plain_stages_do_not_mix() -> None:
    _, stages = stageio_split()
    with pytest.raises(ValueError, match="either split stages or plain modules"):
        Pipeline([stages[0], nn.Identity()], ["cpu"] * 2, chunks=2)


def test_stageio_must_be_in_order_and_complete() -> None:
    _, stages = stageio_split()
    with pytest.raises(ValueError, match="carries the StageIO of stage 1"):
        Pipeline([stages[1], stages[0], stages[2]], ["cpu"] * 3, chunks=2)
    program = stages[0].meta["modelsplit"].program
    ios = [StageIO(0, ("x",), ("a",), program), StageIO(1, ("a", "zz"), ("y",), program)]
    with pytest.raises(ValueError, match=r"stage 1 reads \['zz'\]"):
        stageio_route(ios).validate()
    with pytest.raises(ValueError, match=r"model output reads \['t'\]"):
        stageio_route(ios[:1] + [StageIO(1, ("a",), ("y",), program)]).validate()


def test_real_split_if_available() -> None:
    pytest.importorskip("partitioner.splitting.cut")
    from partitioner import profile, solve, split, trace

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = torch.relu(self.a(x))
            return {"y": self.c(torch.relu(self.b(h)) + h), "h": h}

    model, x = Net(), torch.randn(12, 8)
    gm = trace(model, (x,))
    plan = solve(profile(gm, (x,)), devices=3)
    stages = split(gm, plan)
    pipe = Pipeline(stages, plan.devices, chunks=4)  # abstract "dev:k" names: CPU workers
    for batch in (x, torch.randn(5, 8)):
        out, want = pipe(batch), model(batch)
        torch.testing.assert_close(out["y"], want["y"])
        torch.testing.assert_close(out["h"], want["h"])
    params = dict(gm.named_parameters())
    (out["y"].sum() + out["h"].sum()).backward()
    got = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    gm.zero_grad()
    want = gm(batch)
    (want["y"].sum() + want["h"].sum()).backward()
    assert got.keys() == {name for name, p in params.items() if p.grad is not None} != set()
    for name, grad in got.items():
        torch.testing.assert_close(grad, params[name].grad)


# -- failures and threads --------------------------------------------------------------


class Fail(nn.Module):
    def __init__(self, on: int, exc: BaseException | None = None) -> None:
        super().__init__()
        self.on, self.calls, self.exc = on, 0, exc or ValueError("bad value")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.on:
            raise self.exc
        return x


class Slow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.01)
        return x


def test_exception_names_stage_device_microbatch_and_chains() -> None:
    before = threading.active_count()
    pipe = Pipeline([nn.Identity(), Fail(on=2)], ["cpu", "dev:1"], chunks=4)
    with pytest.raises(StageError, match="stage 1 on cpu failed on micro-batch 2") as info:
        pipe(torch.randn(8, 2))
    err = info.value
    assert (err.stage, err.device, err.microbatch) == (1, "cpu", 2)
    assert isinstance(err.original, ValueError) and err.__cause__ is err.original
    assert "bad value" in str(err) and err.original.__traceback__ is not None
    assert sorted(err.completed) == [0, 1] and err.completed[0].shape == (2, 2)
    assert pipe.last_run is not None and pipe.last_run.failed == (2, 1)
    assert threading.active_count() == before


def test_exception_stops_the_pipeline_early() -> None:
    slow = Slow()
    pipe = Pipeline([slow, Fail(on=0)], ["cpu", "cpu"], chunks=32)
    before = threading.active_count()
    with pytest.raises(StageError):
        pipe(torch.randn(32, 2))
    assert slow.calls < 8  # the first failure came at micro-batch 0 on stage 1
    assert threading.active_count() == before


def test_keyboard_interrupt_stops_cleanly() -> None:
    # A real SIGINT, while the main thread waits on the workers: the stage that sends it
    # holds its micro-batch until the main thread has taken the interrupt, so the call
    # cannot finish first (the simulated interrupt_main() could land after it, and flaked).
    taken = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        taken.set()
        raise KeyboardInterrupt

    class Interrupt(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not taken.is_set():
                os.kill(os.getpid(), signal.SIGINT)
                assert taken.wait(10), "the main thread never took the interrupt"
            return x

    before = threading.active_count()
    pipe = Pipeline([nn.Identity(), Interrupt(), nn.Identity()], ["cpu"] * 3, chunks=8)
    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        with pytest.raises(KeyboardInterrupt):
            pipe(torch.randn(8, 2))
    finally:
        signal.signal(signal.SIGINT, old)
    assert taken.is_set()
    assert threading.active_count() == before


def test_base_exception_in_a_worker_is_reraised_as_is() -> None:
    pipe = Pipeline([Fail(on=0, exc=SystemExit(3))], ["cpu"], chunks=2)
    with pytest.raises(SystemExit):
        pipe(torch.randn(2, 2))


def test_on_task_hook_sees_every_task_and_can_inject_a_failure() -> None:
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def hook(i: int, j: int) -> None:
        with lock:
            seen.append((i, j))

    pipe = Pipeline([nn.Identity()] * 3, ["cpu"] * 3, chunks=4, on_task=hook)
    pipe(torch.randn(4, 1))
    assert sorted(seen) == [(i, j) for i in range(4) for j in range(3)]
    for j in range(3):  # each stage meets micro-batches in order
        assert [i for i, s in seen if s == j] == [0, 1, 2, 3]

    def inject(i: int, j: int) -> None:
        if (i, j) == (2, 2):  # last stage: 0 and 1 finished before, in order
            raise MemoryError("injected")

    pipe.on_task = inject
    with pytest.raises(StageError, match="stage 2 on cpu failed on micro-batch 2") as info:
        pipe(torch.randn(4, 1))
    assert isinstance(info.value.original, MemoryError)
    assert sorted(info.value.completed) == [0, 1]


# -- CPU threads -----------------------------------------------------------------------


class Threads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return x


def test_cpu_stages_share_the_cores_and_the_default_is_restored() -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    a, b = Threads(), Threads()
    before = torch.get_num_threads()
    Pipeline([a, b], ["cpu", "cpu"], chunks=3)(torch.randn(3, 1))
    # In steady state two CPU stages share the cores; micro-batch 0 on stage 0 (the fill)
    # and the last on stage 1 (the drain) run alone and borrow the idle stage's cores.
    half = max(1, cores // 2)
    assert a.seen == [cores, half, half]
    assert b.seen == [half, half, cores]
    d, e = Threads(), Threads()
    Pipeline([d, e], ["cpu", "cpu"], chunks=3, threads=1)(torch.randn(3, 1))
    assert d.seen == e.seen == [1, 1, 1]  # a fixed count is kept
    fresh: list[int] = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == before and fresh == [before]
    c = Threads()
    Pipeline([c], ["cpu"], chunks=1, threads=1)(torch.randn(1, 1))
    assert c.seen == [1]


# -- checkpointing ---------------------------------------------------------------------


class Count(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize(
    ("mode", "recomputed"),
    [("never", 0), ("except_last", 3), ("always", 4), (["always", "never"], 4)],
)
def test_checkpoint_modes(mode: Any, recomputed: int) -> None:
    model = mlp()
    first, second = Count(model[:6]), Count(model[6:])
    pipe = Pipeline([first, second], ["cpu", "cpu"], chunks=4, checkpoint=mode)
    assert_transparent(model, pipe, torch.randn(8, 8))
    assert first.calls == 4 + recomputed
    assert second.calls == 4 + (recomputed if isinstance(mode, str) else 0)
    with torch.no_grad():
        pipe(torch.randn(8, 8))


# -- arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"devices": ["cpu"]}, "one device per stage"),
        ({"chunks": 0}, "chunks must be a positive integer"),
        ({"checkpoint": "sometimes"}, "checkpoint must be one of"),
        ({"checkpoint": ["never"]}, "one mode per stage"),
        ({"reducer": "median"}, "reducer must be"),
        ({"threads": [1]}, "one count per stage"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"devices": ["cpu", "cpu"], "chunks": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        Pipeline([nn.Identity(), nn.Identity()], **args)
    with pytest.raises(ValueError, match="at least one stage"):
        Pipeline([], [], chunks=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda() -> None:
    with pytest.raises(ValueError, match="needs CUDA"):
        Pipeline([nn.Identity()], ["cuda:0"], chunks=1)


def test_mismatched_batch_sizes() -> None:
    pipe = Pipeline([TwoIn()], ["cpu"], chunks=2)
    with pytest.raises(ValueError, match="different batch sizes"):
        pipe(torch.randn(4, 2), torch.randn(3, 2))


def test_overhead_per_hop_is_small() -> None:
    n, m = 4, 64
    pipe = Pipeline([nn.Identity() for _ in range(n)], ["cpu"] * n, chunks=m)
    x = torch.randn(m, 1)
    pipe(x)
    best = min(_timed(pipe, x) for _ in range(5))
    assert best / (m * n) < 2e-3  # generous: a loaded CI box; the benchmark reports ~40 µs


def _timed(pipe: Pipeline, x: torch.Tensor) -> float:
    start = time.perf_counter()
    pipe(x)
    return time.perf_counter() - start


# -- CUDA (skipped without a GPU; run on one later) ----------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_devices() -> Sequence[str]:
    return ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= 2 else ["cuda:0", "cpu"]


@cuda
@pytest.mark.parametrize("same_device", [True, False])
def test_cuda_two_stage_transparency(same_device: bool) -> None:
    devices = ["cuda:0", "cuda:0"] if same_device else list(_cuda_devices())
    model = mlp(width=64)
    stages = [model[:6], model[6:]]
    for stage, device in zip(stages, devices, strict=True):
        stage.to(device)
    x = torch.randn(33, 64, device=devices[0])
    pipe = Pipeline(stages, devices, chunks=4)
    out = pipe(x)
    assert out.device == torch.device(devices[1] if devices[1] != "cpu" else "cpu")
    ref_model = mlp(width=64)
    ref_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    expected = ref_model(x.cpu())
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)
    out.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    for got, want in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert got.grad is not None and want.grad is not None
        torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=1e-4, atol=1e-4)


@cuda
def test_cuda_copy_overlaps_next_compute() -> None:
    """Stage 0's compute of micro-batch i+1 runs while micro-batch i is being copied."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    devices = list(_cuda_devices())
    width = 4096
    first = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)]).to(devices[0])
    second = nn.Identity()
    pipe = Pipeline([first, second], devices, chunks=8)
    x = torch.randn(8 * 1024, width, device=devices[0])
    with torch.no_grad():
        pipe(x)  # warm up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            pipe(x)
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/trace.json"
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    copies = [e for e in spans if e.get("cat") == "gpu_memcpy"]
    kernels = [e for e in spans if e.get("cat") == "kernel"]
    assert copies and kernels
    overlapping = [
        (c, k)
        for c in copies
        for k in kernels
        if k["args"].get("stream") != c["args"].get("stream")
        and k["ts"] < c["ts"] + c["dur"]
        and c["ts"] < k["ts"] + k["dur"]
    ]
    assert overlapping, "no copy overlapped a compute kernel on another stream"


# -- concurrency and caller state -------------------------------------------------------


class Span(nn.Module):
    """Sleeps (releasing the GIL) and records when each call ran."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[tuple[float, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(0.05)
        self.spans.append((start, time.perf_counter()))
        return x


def test_stages_run_concurrently() -> None:
    first, second = Span(), Span()
    Pipeline([first, second], ["cpu", "cpu"], chunks=4)(torch.randn(4, 1))
    # Stage 0 computes micro-batch 1 while stage 1 computes micro-batch 0.
    (start0, end0), (start1, end1) = first.spans[1], second.spans[0]
    assert start0 < end1 and start1 < end0


def test_autocast_reaches_the_workers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Pipeline([model[0], model[1]], ["cpu", "cpu"], chunks=2)(torch.randn(4, 4))
    assert out.dtype == torch.bfloat16


def _dropout_stage(log: list[tuple[bool, ...]]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(6):
        drop = nn.Dropout(0.5)
        drop.register_forward_hook(lambda m, i, o: log.append(tuple((o[0] == 0).tolist())))
        layers += [nn.Linear(64, 64), drop]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("backward", ["autograd", "pipelined"])
def test_checkpoint_recomputes_the_dropout_masks_of_the_forward(backward: str) -> None:
    # Two CPU stages draw from one generator at once; a recomputation must still draw the
    # masks its forward drew ([Note: random ops and recomputation]), else gradients are wrong.
    logs: list[list[tuple[bool, ...]]] = [[], []]
    stages = [_dropout_stage(log) for log in logs]
    pipe = Pipeline(stages, ["cpu", "cpu"], chunks=4, checkpoint="always", backward=backward)
    pipe(torch.randn(16, 64)).sum().backward()
    for log in logs:
        forward, recomputed = log[:24], log[24:]  # 4 micro-batches x 6 dropouts, then backward
        assert recomputed and set(recomputed) <= set(forward)


def test_rng_locks_only_where_a_generator_is_shared_under_checkpointing() -> None:
    from runtime.checkpoint import draws_random, rng_locks

    drop, plain = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)), nn.Linear(2, 2)
    assert draws_random(drop) and not draws_random(plain)
    assert not draws_random(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)).eval())
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    assert draws_random(traced)

    class Functional(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(x, 0.1, training=True) + torch.rand_like(x)

    assert draws_random(torch.fx.symbolic_trace(Functional()))  # call_function targets

    class Deterministic(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.normalize(nn.functional.layer_norm(x, (2,)), dim=1)

    assert not draws_random(torch.fx.symbolic_trace(Deterministic()))
    cpu = [torch.device("cpu")] * 3
    locks = rng_locks([drop, plain, drop], cpu, [2, 2, 2])
    assert locks[0] is not None and locks[0] is locks[2] and locks[1] is None
    assert rng_locks([drop, plain, drop], cpu, [0, 0, 0]) == [None] * 3  # no checkpointing
    assert rng_locks([drop, plain], cpu[:2], [2, 2]) == [None, None]  # one random stage
