"""verify_split: the built pipeline against the unsplit model on the example
([Note: verifying the split])."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from partitioner import ModelSplitError, ModelSplitter
from partitioner.capture.verify import verify_split


class _Scale(torch.autograd.Function):
    """Identity forward, gradient times ``factor``: outputs agree, gradients do not."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g * ctx.factor, None


class _Stub:
    """A pipeline that runs the model, then bends its output or its gradient."""

    chunks, min_rows = 1, 1  # one micro-batch, as a Pipeline says

    def __init__(
        self,
        model: nn.Module,
        *,
        shift: float = 0.0,
        factor: float = 1.0,
        only_with_onednn: bool = False,
    ) -> None:
        self.model, self.shift, self.factor = model, shift, factor
        self.only_with_onednn = only_with_onednn
        self._transfer = SimpleNamespace(cpu_only=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.only_with_onednn and not torch.backends.mkldnn.enabled:
            return out
        return _Scale.apply(out, self.factor) + self.shift


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).eval()


def test_outputs_that_differ_are_an_error() -> None:
    model = _model()
    with pytest.raises(ModelSplitError, match="does not match the unsplit model.*output leaf 0"):
        verify_split(model, _Stub(model, shift=0.1), (torch.randn(4, 8),), {})


def test_gradients_that_differ_are_an_error_and_nothing_is_left_behind() -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ModelSplitError, match="the gradient of '0.weight' differs") as info:
        verify_split(model, _Stub(model, factor=1.05), (torch.randn(4, 8),), {})
    assert "oneDNN" not in str(info.value)  # the same with oneDNN off: not named
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    verify_split(model, _Stub(model), (torch.randn(4, 8),), {})  # agreeing: no error
    # a graph kept for inference only: its gradients are not compared
    verify_split(model, _Stub(model, factor=1.05), (torch.randn(4, 8),), {}, gradients=False)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_a_difference_that_goes_with_onednn_off_names_onednn() -> None:
    model = _model()
    stub = _Stub(model, factor=1.05, only_with_onednn=True)
    with pytest.raises(ModelSplitError, match=r"with oneDNN off \(torch.backends.mkldnn"):
        verify_split(model, stub, (torch.randn(4, 8),), {})
    assert torch.backends.mkldnn.enabled  # switched back on


def test_training_mode_and_gpu_pipelines_are_not_verified() -> None:
    model = _model().train()
    verify_split(model, _Stub(model, shift=1.0), (torch.randn(4, 8),), {})
    model.eval()
    stub = _Stub(model, shift=1.0)
    stub._transfer.cpu_only = False
    verify_split(model, stub, (torch.randn(4, 8),), {})


def test_model_splitter_verifies_its_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    import partitioner.capture.verify as verify

    seen: list[Any] = []
    real = verify.verify_split
    monkeypatch.setattr(verify, "verify_split", lambda *a: seen.append(a) or real(*a))
    model = _model()
    x = torch.randn(8, 8)
    splitter = ModelSplitter(model, devices=["cpu:0", "cpu:1"], chunks=4, example_inputs=(x,))
    assert len(seen) == 1 and seen[0][1] is splitter.pipeline
    torch.testing.assert_close(splitter(x), model(x))  # micro-batches of 2 rows: verified
    assert len(seen) == 1
    torch.testing.assert_close(splitter(x[:4]), model(x[:4]))  # of 1 row: verified again
    assert len(seen) == 2 and seen[1][2][0].shape[0] == 4
    splitter(x[:4])
    splitter(x[:6])  # no micro-batch smaller than one already verified
    assert len(seen) == 2


def test_a_call_with_smaller_micro_batches_is_verified_on_its_inputs() -> None:
    from partitioner.capture.verify import verify_smaller

    model = _model()

    class OneRowBends(_Stub):  # wrong only on one-row micro-batches, as oneDNN was
        chunks = 4

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            self.factor = 1.05 if x.shape[0] <= self.chunks else 1.0
            return super().__call__(x)

    compiled = SimpleNamespace(pipeline=OneRowBends(model), verified=2, gm=None)
    verify_smaller(model, compiled, (torch.randn(8, 8),), {})  # 2 rows each: not again
    with pytest.raises(ModelSplitError, match=r"on this call \(its micro-batches of 1 row"):
        verify_smaller(model, compiled, (torch.randn(4, 8),), {})
    assert compiled.verified == 2  # not marked verified: the next such call checks again
    compiled.verified = None  # never verified (training mode, GPU stages): not checked
    verify_smaller(model, compiled, (torch.randn(4, 8),), {})


def test_a_split_re_planned_off_a_lost_device_is_verified_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import partitioner.capture.verify as verify
    from runtime import inject_failure

    seen: list[Any] = []
    real = verify.verify_split
    monkeypatch.setattr(verify, "verify_split", lambda *a: seen.append(a) or real(*a))
    model = _model()
    x = torch.randn(8, 8)
    splitter = ModelSplitter(
        model,
        devices=["cpu:0", "cpu:1", "cpu:2"],
        chunks=4,
        on_failure="replan",
        example_inputs=(x,),
    )
    assert len(seen) == 1
    with inject_failure(splitter, stage=1, microbatch=0):
        torch.testing.assert_close(splitter(x), model(x))  # recovered on the survivors
    assert splitter.failed_devices
    splitter(x)  # the first call on the new split verifies it
    assert len(seen) == 2 and seen[1][1] is splitter.pipeline
    splitter(x)
    assert len(seen) == 2
