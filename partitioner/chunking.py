"""How many micro-batches a `ModelSplitter` runs when the user did not say.

[Note: choosing micro-batches]
GPipe wants many micro-batches (the bubble is (K - 1) / (M + K - 1) of the step), but the
split model must stay the model, and the checks say where it does not: the batch check
([Note: batch independence]) and the verify of the built pipeline ([Note: verifying the
split]) raise `MicroBatchError` when micro-batches of some size give other outputs or
gradients than the whole batch. Some models break only on small micro-batches (torch 2.14.1's
oneDNN computes wrong convolution gradients on one-row batches at one intra-op thread:
ResNet-50, RegNet, LeViT, ReXNet); some break on any cut (a (B, B) similarity matrix, a
statistic over the batch, a loss the reducer cannot rebuild).

With ``chunks`` given, such an error is raised: the user chose. With ``chunks=None`` (the
default: `default_chunks`, up to 2 micro-batches per device) the splitter instead plans
again with bigger micro-batches: at least twice the rows of the smallest one that failed
(a `Cut` with ``min_rows``: a call of B rows runs ``min(chunks, B // min_rows)`` micro-batches,
so large batches keep every micro-batch), or, after an error that no cut avoids, one
micro-batch per call. Each step says so once in a warning that quotes the error. The same
holds for a later call whose micro-batches are smaller than any verified (`verify_smaller`):
its pipeline takes the bigger ``min_rows``, for that call and the ones after. When one
micro-batch per call does not match either, the error is raised.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from partitioner.capture.checks import first_line
from partitioner.capture.verify import verify_smaller
from partitioner.errors import MicroBatchError
from runtime.microbatch import capped

__all__ = ["Cut", "choose_cut", "verify_call"]

T = TypeVar("T")


@dataclass(frozen=True)
class Cut:
    """At most ``chunks`` micro-batches per call, of at least ``min_rows`` rows each."""

    chunks: int
    min_rows: int = 1

    def count(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
        """The micro-batches a call of ``args, kwargs`` runs as."""
        return capped((tuple(args), dict(kwargs)), self.chunks, self.min_rows)


def next_cut(cut: Cut, exc: MicroBatchError, count: int) -> Cut | None:
    """The cut to plan with after ``exc`` on a call ``cut`` runs as ``count`` micro-batches;
    None when that is one already (nothing is left to try)."""
    if count <= 1:
        return None
    if exc.any_cut:
        return Cut(1)
    return Cut(cut.chunks, max(cut.min_rows, exc.rows) * 2)


def _bigger(
    model: nn.Module,
    exc: MicroBatchError,
    cut: Cut,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    auto: bool,
) -> Cut:
    """The cut to try after ``exc``, said in a warning; ``exc`` again when not ``auto`` or
    when nothing is left to try."""
    bigger = next_cut(cut, exc, cut.count(args, kwargs)) if auto else None
    if bigger is None:
        raise exc
    _warn(model, exc, bigger)
    return bigger


def _warn(model: nn.Module, exc: MicroBatchError, cut: Cut) -> None:
    how = (
        "one micro-batch per call (no pipelining over micro-batches)"
        if cut.chunks == 1
        else f"micro-batches of at least {cut.min_rows} rows"
    )
    warnings.warn(
        f"{first_line(exc)}. chunks was not given, so {type(model).__name__}'s splitter "
        f"runs {how} instead ([Note: choosing micro-batches]; pass chunks= to choose, and "
        f"get this as an error)",
        UserWarning,
        stacklevel=5,
    )


def choose_cut(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    cut: Cut,
    auto: bool,
    build: Callable[[Cut], T],
) -> T:
    """``build(cut)``, again with bigger micro-batches after each `MicroBatchError` when
    ``auto`` ([Note: choosing micro-batches])."""
    while True:
        try:
            return build(cut)
        except MicroBatchError as exc:
            cut = _bigger(model, exc, cut, args, kwargs, auto)


def verify_call(
    model: nn.Module, compiled: Any, args: Sequence[Any], kwargs: Mapping[str, Any], auto: bool
) -> None:
    """`verify_smaller` on this call; with ``auto``, a mismatch moves ``compiled`` (its cut
    and its pipeline) to bigger micro-batches instead of raising, as `choose_cut` does."""
    while True:
        try:
            return verify_smaller(model, compiled, args, kwargs)
        except MicroBatchError as exc:
            pipe = compiled.pipeline
            cut = compiled.cut or Cut(pipe.chunks, pipe.min_rows)
            compiled.cut = cut = _bigger(model, exc, cut, args, kwargs, auto)
            pipe.chunks, pipe.min_rows = cut.chunks, cut.min_rows
