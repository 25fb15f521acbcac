"""Pipelined backward with gradients autograd shares between tensors (issue 15.1).

With one-row micro-batches ``autograd.grad`` hands back one tensor, or views of one, for
several gradients: a broadcast parameter's gradient is its consumer's (``h + pos`` with
``pos`` of shape (1, L, D)), a class token's a view of it through ``cat``. Summing over
micro-batches must not write into such a tensor.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter
from runtime import Pipeline

DEVICES = [f"cpu:{k}" for k in range(4)]


class TinyViT(nn.Module):
    """A class token read as ``expand(B, -1, -1)`` and a (1, L, D) position embedding."""

    def __init__(self, tokens: int = 4, width: int = 8) -> None:
        super().__init__()
        self.patch = nn.Linear(6, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width))
        self.mix = nn.Linear(width, width)
        self.mlp = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), h], dim=1)
        h = h + self.pos_embed
        h = self.mix(h).relu() + h.mean(1, keepdim=True)
        h = self.mlp(h).tanh() + h
        return self.head(h[:, 0] + h.mean(1))


class Aliased(nn.Module):
    """One parameter under two attribute names, read by two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.bias = nn.Parameter(torch.randn(1, 8))
        self.shift = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) + self.bias
        h = self.b(h).relu() + self.shift
        return self.c(h)


def _assert_same_grads(model: nn.Module, reference: nn.Module) -> None:
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("mode", ["fx", "export"])
@pytest.mark.parametrize(
    ("factory", "shape"), [(TinyViT, (8, 4, 6)), (Aliased, (8, 8))], ids=["vit", "aliased"]
)
def test_split_gradients_match_unsplit(
    factory: type[nn.Module], shape: tuple[int, ...], mode: str
) -> None:
    # Batch 8 in 8 chunks on 4 devices: one-row micro-batches, as in the issue.
    torch.manual_seed(0)
    model = factory()
    reference = copy.deepcopy(model)
    x = torch.randn(*shape)
    splitter = ModelSplitter(
        model, devices=DEVICES, chunks=8, backward="pipelined", trace_mode=mode, time_limit=5
    )
    out = splitter(x)
    want = reference(x)
    torch.testing.assert_close(out, want)
    out.pow(2).sum().backward()
    want.pow(2).sum().backward()
    _assert_same_grads(model, reference)


class _Embed(nn.Module):
    def __init__(self, tokens: int = 4, width: int = 8) -> None:
        super().__init__()
        self.patch = nn.Linear(6, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch(x)], dim=1)
        return h + self.pos_embed


class _Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h).tanh() + h.mean(1, keepdim=True)


class _Shift(nn.Module):
    """Its parameter's gradient is, per one-row micro-batch, the output gradient itself."""

    def __init__(self, tokens: int = 4, width: int = 8) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(1, tokens + 1, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.shift


def test_broadcast_parameters_in_plain_stages() -> None:
    # The same shapes with a fixed split: the embedding stage's cls_token and pos_embed
    # gradients share one tensor, and the last stage's is a view of the caller's gradient.
    torch.manual_seed(0)
    model = nn.Sequential(_Embed(), _Block(), _Block(), _Shift())
    reference = copy.deepcopy(model)
    x = torch.randn(8, 4, 6, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    pipe = Pipeline(list(model), ["cpu"] * 4, chunks=8, backward="pipelined")
    grad = torch.randn(8, 5, 8)
    kept = grad.clone()
    pipe(x).backward(grad)
    reference(xr).backward(grad.clone())
    torch.testing.assert_close(grad, kept, rtol=0, atol=0)  # the caller's tensor, unchanged
    _assert_same_grads(model, reference)
    torch.testing.assert_close(x.grad, xr.grad)


class _SlowBackward(nn.Module):
    """A linear layer whose backward takes a while to read its output's gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.requires_grad:
            y.register_hook(lambda g: (time.sleep(0.05), g)[1])
        return y


class _AddShared(nn.Module):
    def __init__(self, bias: nn.Parameter) -> None:
        super().__init__()
        self.bias = bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h + self.bias).tanh()


def test_parameter_gradient_that_is_the_previous_stages_input_gradient() -> None:
    # Stage 1 starts with h + bias: with one-row micro-batches both gradients are one tensor,
    # which stage 0 is still reading (slowly) while stage 1 sums the next micro-batch's.
    # The parameter is also read under another name by stage 2 (tied across stages).
    torch.manual_seed(0)
    bias = nn.Parameter(torch.randn(1, 8))
    model = nn.Sequential(_SlowBackward(), _AddShared(bias), _AddShared(bias), nn.Linear(8, 2))
    reference = copy.deepcopy(model)
    assert reference[1].bias is reference[2].bias
    x = torch.randn(6, 8)
    pipe = Pipeline(list(model), ["cpu"] * 4, chunks=6, backward="pipelined")
    pipe(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    _assert_same_grads(model, reference)
