"""Batch independence ([Note: batch independence]): a model that mixes rows of the batch is
an error before planning, BatchNorm in training a warning, and nothing else is flagged."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from partitioner import ModelSplitError, ModelSplitter
from partitioner.capture.batching import check_batch_independence
from partitioner.examples import MyModel

DEVICES = ["cpu:0", "cpu:1"]


class Contrastive(nn.Module):
    """CLIP-style: every row against every other row, a (B, B) matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)
        return z @ z.T


class Centred(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h - h.mean(0)  # a statistic over the batch


class Loss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).pow(2).mean()


def test_a_batch_by_batch_output_is_an_error_naming_the_shapes() -> None:
    with pytest.raises(ModelSplitError, match=r"mixes rows.*\(8, 8\).*\(8, 4\).*chunks=1"):
        ModelSplitter(
            Contrastive(), devices=DEVICES, chunks=2, example_inputs=(torch.randn(8, 16),)
        )


def test_a_statistic_over_the_batch_is_an_error() -> None:
    with pytest.raises(ModelSplitError, match="mixes rows.*output leaf 0 differs by up to"):
        ModelSplitter(Centred(), devices=DEVICES, chunks=4, example_inputs=(torch.randn(8, 16),))


def test_without_micro_batches_there_is_nothing_to_mix() -> None:
    model, x = Contrastive(), torch.randn(8, 16)
    splitter = ModelSplitter(model, devices=DEVICES, chunks=1, example_inputs=(x,))
    torch.testing.assert_close(splitter(x), model(x))


def test_row_independent_models_pass_in_both_modes() -> None:
    model, x = MyModel(), torch.randn(8, 64)
    check_batch_independence(model, (x,), {}, 4)
    loss = Loss().train()  # dropout: checked in eval mode, so no false alarm
    check_batch_independence(loss, (x[:, :16],), {}, 4, reducer="mean")
    assert loss.training and all(m.training for m in loss.modules())  # modes put back
    check_batch_independence(loss, (x[:, :16],), {}, 4)  # no reducer: the runtime says so


def test_the_check_leaves_no_trace_on_the_model() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)).train()
    x = torch.randn(8, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    check_batch_independence(model, (x,), {}, 4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_batch_norm_in_training_is_one_warning_naming_the_layers() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()).train()
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match=r"trains BatchNorm layers \(1\).*deferred_batch_norm"):
        ModelSplitter(model, devices=DEVICES, chunks=2, example_inputs=(x,))
    # deferred statistics do not make the outputs the unsplit model's: still said
    with pytest.warns(UserWarning, match=r"outputs and gradients differ.*only the first layer"):
        ModelSplitter(
            model, devices=DEVICES, chunks=2, deferred_batch_norm=True, example_inputs=(x,)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelSplitter(model.eval(), devices=DEVICES, chunks=2, example_inputs=(x,))


def test_a_buffer_that_counts_calls_is_a_warning_naming_it() -> None:
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.steps += 1
            return self.lin(x)

    model, x = Counting(), torch.randn(8, 16)
    with pytest.warns(UserWarning, match=r"updates buffer\(s\) 'steps'.*4 micro-batches"):
        check_batch_independence(model, (x,), {}, 4)
    assert int(model.steps) == 0  # the check left it as it was


class TokenMean(nn.Module):
    """A token-level loss as Hugging Face computes it: a mean over the labels not ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kept = labels != -100
        per_token = self.lin(x).pow(2)
        return (per_token * kept).sum() / kept.sum()


def test_a_loss_the_reducer_cannot_rebuild_is_refused_with_the_reason() -> None:
    x, labels = torch.randn(8, 16), torch.zeros(8, 16, dtype=torch.long)
    labels[:2, 2:] = -100  # the first micro-batch counts far fewer tokens
    with pytest.raises(ModelSplitError, match=r"no batch dimension \(a loss\?\).*-100"):
        ModelSplitter(
            TokenMean(),
            devices=DEVICES,
            chunks=4,
            reducer="mean",
            example_inputs=(x,),
            example_kwargs={"labels": labels},
        )
    check_batch_independence(TokenMean(), (x,), {"labels": torch.zeros_like(labels)}, 4, "mean")


class OneRowGrads(nn.Module):
    """Outputs independent of the batch, gradients not: a custom backward that scales by
    the rows it sees (as timm's XCiT and LeViT do, through some op, on one-row batches)."""

    class _Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
            ctx.rows = x.shape[0]  # type: ignore[attr-defined]
            return x.clone()

        @staticmethod
        def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
            return grad * (2.0 if ctx.rows == 1 else 1.0)  # type: ignore[attr-defined]

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._Scale.apply(self.lin(x))


def test_gradients_that_depend_on_the_cut_are_refused() -> None:
    x = torch.randn(4, 16)
    with pytest.raises(ModelSplitError, match=r"gradients depend on how the batch is cut.*lin"):
        check_batch_independence(OneRowGrads(), (x,), {}, 4)
    check_batch_independence(OneRowGrads(), (x,), {}, 2)  # two-row micro-batches are fine


class _Tiny(OneRowGrads):
    """OneRowGrads whose loss is small: every gradient stays far below the outputs' ATOL
    (LeViT's reach 4e-6, its stem's 5e-10, and differ by 100% on one-row micro-batches)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1e-4


def test_small_gradients_are_compared_to_their_own_size() -> None:
    x = torch.randn(4, 16)
    with pytest.raises(ModelSplitError, match=r"gradient of 'lin\.weight' differs"):
        check_batch_independence(_Tiny(), (x,), {}, 4)
    check_batch_independence(_Tiny(), (x,), {}, 2)


def test_the_micro_batches_run_with_the_stages_threads() -> None:
    # torch's oneDNN kernels can give other gradients at one intra-op thread than at two
    # (ResNet-50 on one-row micro-batches): the check runs them as the stages will.
    import contextlib

    seen: list[tuple[int, int]] = []

    class Records(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((x.shape[0], torch.get_num_threads()))
            return self.lin(x)

    @contextlib.contextmanager
    def one_thread():  # type: ignore[no-untyped-def]
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    caller = torch.get_num_threads()
    check_batch_independence(Records(), (torch.randn(4, 4),), {}, 2, as_stages=one_thread)
    assert seen == [(4, caller), (2, 1), (2, 1)]
    assert torch.get_num_threads() == caller
