"""Models that write to their own inputs ([Note: writes to model inputs] in runtime.interface)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter, trace
from partitioner.capture.binding import program_of, run_program
from partitioner.splitting.compose import run_stages


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))


class ReadThenWrite(nn.Module):
    """Reads x, then doubles it in place, then reads it again (zoo's trap_inplace_input)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _mlp(), _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x.clone())
        x.mul_(2)
        return self.b(h) + x


class WriteFirst(nn.Module):
    """Normalises its input in place before anything reads it (``x /= 4``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _mlp(), _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x /= 4
        return self.b(self.a(x))


class WriteThroughView(nn.Module):
    """Writes half of one input's columns and reads the other input, by keyword too."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _mlp(), _mlp()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.a(x + y)
        x[:, :4].add_(1)
        return self.b(h * x)


MODELS = [ReadThenWrite, WriteFirst, WriteThroughView]


def _call(model: type[nn.Module], rows: int = 6) -> tuple[tuple[Any, ...], dict[str, Any]]:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 8, generator=g)
    if model is WriteThroughView:
        return (x,), {"y": torch.randn(rows, 8, generator=g)}
    return (x,), {}


def _copy(call: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
    args, kwargs = call
    return tuple(a.clone() for a in args), {k: v.clone() for k, v in kwargs.items()}


def _eager(model: nn.Module, call: Any) -> tuple[Any, Any]:
    args, kwargs = _copy(call)
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out, (args, kwargs)


@pytest.mark.parametrize("cls", MODELS)
def test_trace_writes_the_input_back_and_leaves_the_example_alone(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    call = _call(cls)
    example = _copy(call)
    gm = trace(model, *example)
    torch.testing.assert_close(example, call, rtol=0, atol=0)  # checking it wrote no example
    assert [name for name, _ in program_of(gm).writes] == ["x"]
    want, want_inputs = _eager(model, call)
    args, kwargs = _copy(call)
    with torch.no_grad():
        got = run_program(gm, args, kwargs)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close((args, kwargs), want_inputs)  # written as the model writes it


def test_fx_refuses_and_auto_falls_back_to_export() -> None:
    model, call = ReadThenWrite().eval(), _call(ReadThenWrite)
    with pytest.raises(Exception, match=r"mutates 'x'.*mode='export'"):
        trace(model, *_copy(call), mode="fx")
    assert trace(model, *_copy(call)).meta["modelsplit_mode"] == "export"


def test_a_model_that_writes_no_input_has_no_writes() -> None:
    gm = trace(_mlp(), (torch.randn(4, 8),), mode="export")
    assert program_of(gm).writes == ()


@pytest.mark.parametrize("cls", MODELS)
def test_stages_run_one_after_another_write_the_input(cls: type[nn.Module]) -> None:
    model = cls().eval()
    call = _call(cls)
    example_args, example_kwargs = _copy(call)
    splitter = ModelSplitter(
        model, num_devices=3, chunks=2, example_inputs=example_args, example_kwargs=example_kwargs
    )
    torch.testing.assert_close((example_args, example_kwargs), call, rtol=0, atol=0)  # untouched
    stages = splitter.stages
    assert len(stages) >= 2
    want, want_inputs = _eager(model, call)
    args, kwargs = _copy(call)
    with torch.no_grad():
        got = run_stages(stages, *args, **kwargs)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close((args, kwargs), want_inputs)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("backward", ["autograd", "pipelined"])
def test_split_model_writes_the_callers_tensor_as_the_model_does(
    cls: type[nn.Module], backward: str
) -> None:
    torch.manual_seed(0)
    model = cls().train()
    call = _call(cls)
    splitter = ModelSplitter(model, num_devices=3, chunks=3, backward=backward)
    for rows in (6, 5):  # planned on the first call (which must write once), then reused
        call = _call(cls, rows)
        args, kwargs = _copy(call)
        ref_args, ref_kwargs = _copy(call)
        out = splitter(*args, **kwargs)
        ref = model(*ref_args, **ref_kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((args, kwargs), (ref_args, ref_kwargs), rtol=0, atol=1e-6)
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
        want = torch.autograd.grad(ref.square().mean(), list(model.parameters()))
        for g, w in zip(grads, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert len(splitter.stages) >= 2


def test_a_training_step_refuses_a_model_that_writes_its_input() -> None:
    model = ReadThenWrite().train()
    x = torch.randn(6, 8)
    splitter = ModelSplitter(model, num_devices=2, chunks=2, example_inputs=(x.clone(),))
    with pytest.raises(ValueError, match=r"writes to its input 'x'.*x = x.clone\(\)"):
        splitter.train_step(x.clone(), target=torch.randn(6, 8), loss_fn=nn.functional.mse_loss)


class WriteScale(nn.Module):
    """Writes an input that has no batch dimension (broadcast to every micro-batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _mlp(), _mlp()

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        scale.mul_(2)
        return self.b(self.a(x) * scale)


def test_a_written_input_without_a_batch_dimension_is_a_clear_error() -> None:
    splitter = ModelSplitter(WriteScale().eval(), num_devices=2, chunks=2)
    with pytest.raises(ValueError, match=r"writes to its input 'scale'.*no batch dimension"):
        splitter(torch.randn(6, 8), torch.ones(1, 8))


def test_the_distributed_backend_refuses_a_model_that_writes_its_input() -> None:
    from runtime.distributed.engine import split_for_ranks

    model, x = ReadThenWrite().eval(), torch.randn(6, 8)
    splitter = ModelSplitter(model, num_devices=2, chunks=2, example_inputs=(x.clone(),))
    with pytest.raises(ValueError, match=r"writes to its input 'x'.*distributed backend"):
        split_for_ranks(model, (x.clone(),), {}, splitter.plan)
