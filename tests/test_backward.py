"""Pipelined backward (backward="pipelined"): gradients against the unsplit model."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter
from partitioner.examples import small
from runtime import Pipeline, StageError
from runtime.schedule import backward_cycles, format_schedule


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


def _assert_same_grads(model: nn.Module, reference: nn.Module) -> None:
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_backward_cycles_reverse_the_stages() -> None:
    cycles = list(backward_cycles(3, 2))
    assert cycles == [[(0, 1)], [(1, 1), (0, 0)], [(2, 1), (1, 0)], [(2, 0)]]
    # Every task follows its consumer's task of the same micro-batch by one cycle.
    at = {task: k for k, cycle in enumerate(backward_cycles(5, 4)) for task in cycle}
    assert all(at[(i, j)] == at[(i, j + 1)] + 1 for i in range(5) for j in range(3))
    grid = format_schedule(backward_cycles(2, 2), phase="B")
    assert grid.splitlines()[1].split() == ["0", "1B0"]


@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_plain_stages_match_unsplit_gradients(chunks: int) -> None:
    model = _mlp()
    reference = copy.deepcopy(model)
    x = torch.randn(10, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    pipe = Pipeline(
        [model[:2], model[2:4], model[4:]], ["cpu"] * 3, chunks=chunks, backward="pipelined"
    )
    threads: set[str] = set()
    model[2].register_full_backward_hook(
        lambda *_: threads.add(threading.current_thread().name)  # type: ignore[func-returns-value]
    )
    before = threading.active_count()
    out = pipe(x)
    torch.testing.assert_close(out, reference(xr))
    out.pow(2).sum().backward()
    assert threads == {"modelsplit-backward-stage1-cpu"}  # stage 1's own worker ran it
    reference(xr).pow(2).sum().backward()
    _assert_same_grads(model, reference)
    torch.testing.assert_close(x.grad, xr.grad)  # the caller's input gets its gradient
    assert threading.active_count() == before


class _Pair(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.a(x), self.b(x if y is None else y).tanh()


def test_tuple_values_between_and_out_of_plain_stages() -> None:
    # Stage 0 returns a tuple, splatted into stage 1, which returns a tuple too.
    torch.manual_seed(0)
    model = nn.Sequential(_Pair(6), _Pair(6))
    reference = copy.deepcopy(model)
    x = torch.randn(5, 6)
    pipe = Pipeline(list(model), ["cpu"] * 2, chunks=2, backward="pipelined")
    out = pipe(x)
    want = reference[1](*reference[0](x))
    assert isinstance(out, tuple) and len(out) == 2
    for a, b in zip(out, want, strict=True):
        torch.testing.assert_close(a, b)
    (out[0].sum() + out[1].pow(2).sum()).backward()
    (want[0].sum() + want[1].pow(2).sum()).backward()
    _assert_same_grads(model, reference)


def test_parameters_only_an_unused_output_reads_keep_grad_none() -> None:
    # As with autograd: no zeros, so optimizers (and weight decay) skip those parameters.
    torch.manual_seed(0)
    model = nn.Sequential(_Pair(6), _Pair(6))
    reference = copy.deepcopy(model)
    pipe = Pipeline(list(model), ["cpu"] * 2, chunks=2, backward="pipelined")
    x = torch.randn(5, 6)
    pipe(x)[0].sum().backward()
    reference[1](*reference[0](x))[0].sum().backward()
    # Output 0 reads model[0].a and model[1].a only; the b layers feed output 1 alone.
    got = {name: p.grad is None for name, p in model.named_parameters()}
    want = {name: p.grad is None for name, p in reference.named_parameters()}
    assert got == want and got["1.b.weight"] and got["0.b.weight"] and not got["0.a.weight"]


def test_autograd_grad_sees_parameter_gradients() -> None:
    # Parameters are inputs of the pipeline's output, so torch.autograd.grad reaches them.
    model = _mlp()
    reference = copy.deepcopy(model)
    x = torch.randn(6, 8)
    pipe = Pipeline([model[:3], model[3:]], ["cpu"] * 2, chunks=3, backward="pipelined")
    got = torch.autograd.grad(pipe(x).sum(), list(model.parameters()))
    want = torch.autograd.grad(reference(x).sum(), list(reference.parameters()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_second_backward_is_a_clear_error() -> None:
    model = _mlp()
    pipe = Pipeline([model[:3], model[3:]], ["cpu"] * 2, chunks=2, backward="pipelined")
    loss = pipe(torch.randn(4, 8)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already ran.*backward='autograd'"):
        loss.backward()


def test_no_grad_call_keeps_no_graph() -> None:
    model = _mlp()
    pipe = Pipeline([model[:3], model[3:]], ["cpu"] * 2, chunks=2, backward="pipelined")
    with torch.no_grad():
        out = pipe(torch.randn(4, 8))
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("checkpoint", ["always", "except_last"])
def test_checkpointed_stages(checkpoint: str) -> None:
    model = _mlp()
    reference = copy.deepcopy(model)
    x = torch.randn(9, 8)
    pipe = Pipeline(
        [model[:2], model[2:]],
        ["cpu"] * 2,
        chunks=3,
        checkpoint=checkpoint,
        backward="pipelined",
    )
    pipe(x).pow(2).mean().backward()
    reference(x).pow(2).mean().backward()
    _assert_same_grads(model, reference)


class _Loss(nn.Module):
    """Returns a scalar loss: the output has no batch dimension, so a reducer combines it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.body(x), target)


def test_reducer_mean_loss_matches_full_batch() -> None:
    model = _Loss()
    reference = copy.deepcopy(model)
    x, target = torch.randn(7, 8), torch.randn(7, 4)
    splitter = ModelSplitter(
        model,
        num_devices=2,
        chunks=3,
        reducer="mean",
        backward="pipelined",
        example_inputs=(x, target),
        time_limit=5,
    )
    loss = splitter(x, target)
    want = reference(x, target)
    torch.testing.assert_close(loss, want)
    loss.backward()
    want.backward()
    _assert_same_grads(model, reference)


@pytest.mark.parametrize(
    ("name", "devices"), [("gpt", 3), ("residual_cnn", 3), ("two_input_dict", 2)]
)
def test_split_models_match_unsplit_gradients(name: str, devices: int) -> None:
    # gpt ties its LM head to the embedding across stages; residual_cnn and two_input_dict
    # have values that skip stages and several inputs and outputs.
    model, args, kwargs = small(name, batch=6)
    reference, _, _ = small(name, batch=6)
    reference.load_state_dict(model.state_dict())
    model.eval()  # BatchNorm in training sees micro-batches: GPipe's rule, not tested here
    reference.eval()
    splitter = ModelSplitter(
        model, num_devices=devices, chunks=3, backward="pipelined", time_limit=5
    )

    def loss_of(out: Any) -> torch.Tensor:
        if isinstance(out, dict):
            return sum(v.float().pow(2).mean() for v in out.values())  # type: ignore[return-value]
        return out.float().pow(2).mean()  # type: ignore[no-any-return]

    loss_of(splitter(*args, **kwargs)).backward()
    loss_of(reference(*args, **kwargs)).backward()
    for (name_a, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name_a
            continue
        torch.testing.assert_close(a.grad, b.grad, msg=name_a, rtol=1e-4, atol=1e-6)


class _FailsInBackward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2

        def hook(grad: torch.Tensor) -> torch.Tensor:
            raise ValueError("bad gradient")

        if x.shape[0] == 1:  # the last, smaller micro-batch
            y.register_hook(hook)
        return y


def test_error_in_a_stage_backward_names_stage_and_microbatch() -> None:
    model = _mlp()
    pipe = Pipeline(
        [model[:3], _FailsInBackward(), model[3:]], ["cpu"] * 3, chunks=3, backward="pipelined"
    )
    before = threading.active_count()
    loss = pipe(torch.randn(5, 8)).sum()
    with pytest.raises(StageError, match="stage 1 on cpu failed on micro-batch 2") as info:
        loss.backward()
    assert isinstance(info.value.original, ValueError)
    assert threading.active_count() == before


def test_bad_options_are_clear_errors() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="backward must be 'autograd' or 'pipelined'"):
        Pipeline([model], ["cpu"], chunks=1, backward="threads")
    with pytest.raises(ValueError, match="cannot re-run lost micro-batches"):
        Pipeline([model], ["cpu"], chunks=1, backward="pipelined", on_failure="replan")
    with pytest.raises(ValueError, match="cannot re-run lost micro-batches"):
        ModelSplitter(model, num_devices=2, backward="pipelined", on_failure="replan")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stages_refuse_pipelined_backward() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="CPU stages only"):
        Pipeline([model[:3], model[3:]], ["cpu", "cuda:0"], chunks=1, backward="pipelined")
