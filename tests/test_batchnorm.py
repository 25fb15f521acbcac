"""Deferred batch norm: running statistics once per call ([Note: deferred batch norm])."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter
from runtime import Pipeline

# These tests train BatchNorm on purpose: the warning that says so is tested in test_batching.
pytestmark = pytest.mark.filterwarnings("ignore:.*trains BatchNorm layers")


class TwoBranches(nn.Module):
    """Each BatchNorm reads a convolution of the input, so its batch statistics do not
    depend on how another BatchNorm normalised micro-batches: they must equal eager's."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4, momentum=None)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.c1(x)).relu() + self.bn2(self.c2(x)).tanh()
        return self.head(h.flatten(1))


@pytest.mark.parametrize("backward", ["autograd", "pipelined"])
def test_running_statistics_equal_the_unsplit_models(backward: str) -> None:
    torch.manual_seed(0)
    model = TwoBranches().train()
    reference = copy.deepcopy(model)
    splitter = ModelSplitter(
        model,
        num_devices=3,
        chunks=4,
        trace_mode="fx",
        backward=backward,
        deferred_batch_norm=True,
        time_limit=5,
    )
    for _ in range(3):
        x = torch.randn(10, 3, 6, 6)
        splitter(x).pow(2).mean().backward()  # backward still works after the update
        reference(x).pow(2).mean().backward()
    for (name, got), want in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(got, want, msg=name, rtol=1e-5, atol=1e-6)
    assert int(model.bn1.num_batches_tracked) == 3  # one update per call


def test_without_deferral_statistics_update_once_per_micro_batch() -> None:
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2)]
    Pipeline(stages, ["cpu", "cpu"], chunks=4)(torch.randn(8, 4))
    assert int(stages[0][1].num_batches_tracked) == 4
    Pipeline(stages, ["cpu", "cpu"], chunks=4, deferred_batch_norm=True)(torch.randn(8, 4))
    assert int(stages[0][1].num_batches_tracked) == 5


def test_a_failed_call_leaves_the_statistics_alone() -> None:
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == 2:  # micro-batch 1, after micro-batch 0 went through bn
                raise ValueError("boom")
            return x

    bn = nn.BatchNorm1d(4)
    before = [b.clone() for b in bn.buffers()]
    pipe = Pipeline([bn, Fails()], ["cpu", "cpu"], chunks=3, deferred_batch_norm=True)
    with pytest.raises(Exception, match="boom"):
        pipe(torch.randn(7, 4))  # micro-batches of 3, 2 and 2 rows
    for got, want in zip(bn.buffers(), before, strict=True):
        torch.testing.assert_close(got, want)


def test_export_traced_batch_norm_is_left_alone_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with caplog.at_level(logging.WARNING, logger="runtime.batchnorm"):
        splitter = ModelSplitter(
            model.train(),
            num_devices=2,
            chunks=2,
            trace_mode="export",
            deferred_batch_norm=True,
            time_limit=5,
        )
        splitter(torch.randn(8, 4))
    assert "export-traced graph" in caplog.text


def test_deferred_statistics_are_exact_for_the_first_layer_and_close_deeper() -> None:
    # What [Note: deferred batch norm] promises on a deep CNN at 2-row micro-batches: the
    # first layer's running statistics are the unsplit model's; deeper layers see inputs
    # normalised per micro-batch, so theirs are the micro-batched network's (close, not equal).
    torch.manual_seed(0)

    def block(c: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    model.extend([block(8) for _ in range(4)])
    model.train()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3, 8, 8)
    splitter = ModelSplitter(model, devices=["cpu:0", "cpu:1"], chunks=4, deferred_batch_norm=True)
    splitter(x)
    reference(x)
    norms = [
        (a, b)
        for a, b in zip(model.modules(), reference.modules(), strict=True)
        if isinstance(a, nn.BatchNorm2d)
    ]
    first, deeper = norms[0], norms[1:]
    torch.testing.assert_close(first[0].running_mean, first[1].running_mean)
    torch.testing.assert_close(first[0].running_var, first[1].running_var)
    assert int(first[0].num_batches_tracked) == 1
    for a, b in deeper:
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-2, atol=1e-3)
