"""Deferred batch norm: running statistics updated once per batch, as without micro-batches.

[Note: deferred batch norm]
In training, a BatchNorm layer normalises each micro-batch with that micro-batch's
statistics (GPipe's rule; the output cannot depend on rows another stage has not seen
yet) and, left alone, also updates its running statistics once per micro-batch: m
updates of a momentum average per call, and ``num_batches_tracked`` counting
micro-batches. With ``deferred_batch_norm=True`` (torchgpipe's option of that name), a
forward pre-hook sums each layer's input per channel over the micro-batches of a call, the
per-micro-batch updates are undone, and one update with the whole batch's mean and
unbiased variance is applied when the call ends (as new tensors: autograd saved the old
ones, which must not change before backward), ``num_batches_tracked`` grows by one per call.

What that guarantees, precisely: the running statistics of a BatchNorm layer whose input
does not pass through an earlier BatchNorm in training (the first of a network) come out as
the unsplit model's (up to rounding). A deeper layer's input was normalised per micro-batch
by the layers before it, which the unsplit model normalises with the whole batch, so its
statistics are those of the micro-batched network: 1e-4 relative on a 5-layer CNN with
2-row micro-batches, 16% on ResNet-18 (`tests/test_batchnorm.py` measures the first case).
Only synchronising every layer across micro-batches (SyncBatchNorm's all-reduce, which a
pipeline cannot do before later micro-batches exist) would make all layers exact.

Applies to BatchNorm modules (fx traces keep them as modules); an export-traced graph has
its batch norms as operators and is left as is, with a warning. A call that fails leaves
the statistics as they were; with ``on_failure="replan"``, a call that meets a device
failure updates them from the micro-batches it re-runs only. A checkpointed stage that
recomputes a BatchNorm layer in backward updates its statistics again, as
`torch.utils.checkpoint` does without a pipeline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["DeferredBatchNorm"]

log = logging.getLogger(__name__)


class _Sums:
    """Per-channel sums of one layer's inputs over a call's micro-batches."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        with torch.no_grad():
            x = x.detach().double()
            total, squares = x.sum(dims), (x * x).sum(dims)
        with self.lock:  # a layer reused by two stages runs in two workers
            self.count += x.numel() // max(1, x.shape[1])
            self.total = total if self.total is None else self.total + total
            self.squares = squares if self.squares is None else self.squares + squares


class DeferredBatchNorm:
    """The BatchNorm layers of ``stages``, whose running statistics a call updates once."""

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        seen: dict[int, _BatchNorm] = {}
        for stage in stages:
            for module in stage.modules():
                if isinstance(module, _BatchNorm):
                    seen.setdefault(id(module), module)
        self.layers = list(seen.values())
        if not self.layers and any(_has_batch_norm_ops(stage) for stage in stages):
            log.warning(
                "deferred_batch_norm: these stages hold batch norm as operators (an "
                "export-traced graph), not BatchNorm modules; their running statistics "
                "update once per micro-batch. Trace with trace_mode='fx' to defer them."
            )

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Run one call with the statistics updates deferred to its end."""
        active = [
            m
            for m in self.layers
            if m.training and m.track_running_stats and m.running_mean is not None
        ]
        if not active:
            yield
            return
        saved = [_state(m) for m in active]
        sums = [_Sums() for _ in active]
        hooks = [m.register_forward_pre_hook(_hook(s)) for m, s in zip(active, sums, strict=True)]
        try:
            yield
        except BaseException:
            for m, state in zip(active, saved, strict=True):
                _restore(m, state)
            raise
        finally:
            for hook in hooks:
                hook.remove()
        for m, state, s in zip(active, saved, sums, strict=True):
            _restore(m, state)
            _update(m, s)


def _hook(sums: _Sums) -> Any:
    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() >= 2:
            sums.add(inputs[0])

    return hook


def _state(m: _BatchNorm) -> tuple[torch.Tensor, ...]:
    assert m.running_mean is not None and m.running_var is not None
    assert m.num_batches_tracked is not None
    return (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())


def _restore(m: _BatchNorm, state: tuple[torch.Tensor, ...]) -> None:
    # New tensors rather than copy_: the micro-batches' autograd graphs saved the old ones,
    # and changing those in place would fail their backward (a version-counter error).
    m.running_mean, m.running_var, m.num_batches_tracked = state


def _update(m: _BatchNorm, s: _Sums) -> None:
    """One running-statistics update with the whole batch, by BatchNorm's own formula."""
    if s.total is None or s.squares is None or s.count == 0:
        return
    assert m.running_mean is not None and m.running_var is not None
    assert m.num_batches_tracked is not None
    mean = s.total / s.count
    var = (s.squares - s.count * mean * mean) / max(1, s.count - 1)  # unbiased, as torch
    with torch.no_grad():
        tracked = m.num_batches_tracked + 1
        factor = 1.0 / float(tracked) if m.momentum is None else float(m.momentum)
        running_mean = m.running_mean * (1 - factor) + factor * mean.to(m.running_mean.dtype)
        running_var = m.running_var * (1 - factor) + factor * var.to(m.running_var.dtype)
    m.running_mean, m.running_var, m.num_batches_tracked = running_mean, running_var, tracked


def _has_batch_norm_ops(stage: nn.Module) -> bool:
    for module in stage.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function" and "batch_norm" in str(node.target):
                    return True
    return False
