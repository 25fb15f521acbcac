"""chunks left out: bigger micro-batches where the model needs them ([Note: choosing
micro-batches] in partitioner/chunking.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_batching import OneRowGrads
from torch import nn

from partitioner import ModelSplitter
from partitioner.chunking import Cut, next_cut
from partitioner.errors import MicroBatchError


def _quirky() -> nn.Module:
    """OneRowGrads: a Linear whose backward is wrong on one-row batches (as torch 2.14.1's
    oneDNN convolutions are at one intra-op thread), kept a leaf so fx does not trace through
    its autograd.Function."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), OneRowGrads(), nn.Linear(16, 8), nn.Linear(8, 8)
    )


class Centred(nn.Module):
    """Subtracts the batch mean: every output row reads every input row."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h - h.mean(0, keepdim=True))


def _grads(model: nn.Module, out: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out.square().mean(), list(model.parameters())))


def _exact(splitter: ModelSplitter, model: nn.Module, x: torch.Tensor) -> None:
    out, want = splitter(x), model(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(_grads(model, out), _grads(model, want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_next_cut_doubles_the_failing_rows_and_stops_at_one_micro_batch() -> None:
    fewer = MicroBatchError("x", rows=1)
    at4 = (torch.randn(4, 2),), {}  # a batch of 4
    assert Cut(8).count(*at4) == 4
    assert next_cut(Cut(8), fewer, Cut(8).count(*at4)) == Cut(8, 2)
    assert next_cut(Cut(8, 2), MicroBatchError("x", rows=2), Cut(8, 2).count(*at4)) == Cut(8, 4)
    assert Cut(8, 4).count(*at4) == 1
    assert next_cut(Cut(8, 4), MicroBatchError("x", rows=4), 1) is None  # one already
    assert next_cut(Cut(8), MicroBatchError("x", rows=1, any_cut=True), 4) == Cut(1)
    assert next_cut(Cut(1), MicroBatchError("x", rows=4, any_cut=True), 1) is None
    assert Cut(8, 2).count((torch.randn(3, 2),), {}) == 1
    assert Cut(8, 2).count((torch.randn(64, 2),), {}) == 8  # big batches keep every chunk


def test_left_out_chunks_pick_bigger_micro_batches_where_small_ones_are_wrong() -> None:
    model = _quirky().eval()
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match=r"gradient.*micro-batches of at least 2 rows instead"):
        splitter = ModelSplitter(
            model, num_devices=2, example_inputs=(x,), leaf_modules=[OneRowGrads], time_limit=5
        )
    pipe = splitter.pipeline
    assert (pipe.chunks, pipe.min_rows) == (4, 2)
    _exact(splitter, model, x)
    assert pipe.last_run.sizes == [2, 2]
    for rows, sizes in ((3, [3]), (16, [4, 4, 4, 4])):  # small calls run whole; big keep 4
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _exact(splitter, model, torch.randn(rows, 8))
        assert pipe.last_run.sizes == sizes


def test_given_chunks_raise_instead() -> None:
    model = _quirky().eval()
    with pytest.raises(MicroBatchError, match="bigger micro-batches"):
        ModelSplitter(
            model,
            num_devices=2,
            chunks=4,
            example_inputs=(torch.randn(4, 8),),
            leaf_modules=[OneRowGrads],
            time_limit=5,
        )


def test_a_later_smaller_call_takes_bigger_micro_batches_too() -> None:
    model = _quirky().eval()
    splitter = ModelSplitter(
        model, num_devices=2, example_inputs=(torch.randn(8, 8),), leaf_modules=[OneRowGrads]
    )
    assert splitter.pipeline.min_rows == 1  # 2-row micro-batches are right
    with pytest.warns(UserWarning, match=r"smallest yet.*at least 2 rows instead"):
        _exact(splitter, model, torch.randn(3, 8))  # [1, 1, 1] would be wrong
    assert splitter.pipeline.last_run.sizes == [3]


def test_outputs_that_mix_rows_run_as_one_micro_batch() -> None:
    torch.manual_seed(0)
    model = Centred().eval()
    x = torch.randn(6, 8)
    with pytest.warns(UserWarning, match=r"mixes rows.*one micro-batch per call"):
        splitter = ModelSplitter(model, num_devices=2, example_inputs=(x,))
    _exact(splitter, model, x)
    assert splitter.pipeline.last_run.sizes == [6]
    with pytest.raises(MicroBatchError, match="mixes rows"):
        ModelSplitter(model, num_devices=2, chunks=2, example_inputs=(x,))
