"""Checks that a model's rows are independent, so micro-batching cannot change its output.

[Note: batch independence]
A pipeline runs each micro-batch on its own and concatenates the outputs. That is the model
only if every output row depends on its own input row alone. A contrastive model's (B, B)
similarity matrix, a statistic over the batch (``x - x.mean(0)``) or a batch-sized reshape
break it, and the split model would return something else without a word: a (B, B) matrix
becomes (B, B/m). So before planning, the model runs once on the whole example batch and
once as the pipeline would run it (`runtime.microbatch.scatter`, then `gather`), in eval
mode with the random stream forked (dropout off, BatchNorm on its running statistics, the
model's state put back), and a difference is a `ModelSplitError` naming the output and the
fixes. The parameter gradients of a loss over the batched outputs are compared the same way
(models up to 1 GiB of parameters): timm's XCiT and LeViT give other gradients on one-row
micro-batches, run unsplit too, with outputs that agree. The micro-batches run with the
intra-op threads each CPU stage will have (``as_stages``): torch 2.14's oneDNN kernels give
ResNet-50 gradients up to 6% off on one-row micro-batches at one thread, not at two (the
whole batch runs with the caller's threads, as the unsplit model does); a gradient that
differs is re-checked with oneDNN off, and when that agrees the error says so. (What the
pipeline itself computes is checked once it is built: [Note: verifying the split].)
BatchNorm in training normalises each micro-batch with its own statistics: that is GPipe's
documented semantics, so it is a warning naming the layers, not an error.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from partitioner.capture.checks import (
    GRAD_CHECK_BYTES,
    batch_size,
    fresh,
    preserved_state,
    square_loss,
)
from partitioner.errors import MicroBatchError, ModelSplitError
from runtime.microbatch import Reducer, bound, gather, scatter

__all__ = [
    "check_batch_independence",
    "differs",
    "gradient_difference",
    "onednn_off",
    "training_batch_norms",
    "warn_ignored_labels",
    "warn_training_batch_norms",
]

log = logging.getLogger(__name__)

#: a difference under ATOL + RTOL * max|whole| is rounding (a GEMM over fewer rows)
RTOL, ATOL = 1e-3, 1e-4
GRAD_FLOOR = 1e-6  # of the largest gradient: the absolute tolerance of the gradient check


class _Skip:
    """Stands for a leaf with no batch dimension when no reducer is given: the pipeline
    rejects those itself, at the first call, with its own message."""


def _skip(values: list[Any]) -> _Skip:
    return _Skip()


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def check_batch_independence(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    chunks: int,
    reducer: Reducer | None = None,
    as_stages: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> None:
    """Raise `ModelSplitError` when ``chunks`` micro-batches of the example call give
    another output than the whole batch: see [Note: batch independence]. The micro-batches
    run inside ``as_stages()`` (the stages' intra-op threads)."""
    call = (tuple(args), dict(kwargs))  # every run below takes copies: never written to
    batch = batch_size(*call)
    if chunks < 2 or batch is None or batch < 2 or _on_meta(model, call):
        return
    pieces, sizes = scatter(call, chunks)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = bool(params) and sum(p.numel() * p.element_size() for p in params) <= GRAD_CHECK_BYTES
    with preserved_state(model), _evaluating(model):
        try:  # one set of runs serves the outputs and, when checked, the gradients
            whole, parts = _runs(model, call, pieces, sizes, grads, as_stages)
        except RuntimeError:  # no backward to compare (the model's own limits)
            grads = False
            whole, parts = _runs(model, call, pieces, sizes, grads, as_stages)
        _check_outputs(model, whole, parts, sizes, bound(reducer, args, kwargs, chunks))
        if grads:
            with as_stages():
                problem = _check_gradients(model, params, whole, parts, sizes)
            if problem is not None:
                raise _cut_gradients(model, params, call, pieces, sizes, problem, as_stages)


def _runs(
    model: nn.Module,
    call: Any,
    pieces: list[Any],
    sizes: Sequence[int],
    grads: bool,
    as_stages: Callable[[], contextlib.AbstractContextManager[Any]],
) -> tuple[Any, list[Any]]:
    """The model on the whole batch, then on each micro-batch inside ``as_stages()`` (with
    autograd if ``grads``)."""
    with torch.enable_grad() if grads else torch.no_grad():
        before = {n: b.clone() for n, b in model.named_buffers()}
        whole = model(*fresh(call[0]), **fresh(call[1]))  # not the pieces' own inputs
        _warn_counters(model, before, len(sizes))
        with as_stages():
            return whole, [model(*fresh(a), **fresh(k)) for a, k in pieces]


def _check_outputs(
    model: nn.Module, whole: Any, parts: list[Any], sizes: Sequence[int], reducer: Any
) -> None:
    def detached(out: Any) -> Any:
        return pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, out)

    try:
        split = gather(detached(parts), sizes, reducer if reducer is not None else _skip)
    except ValueError as exc:
        raise _mixed(model, sizes, f"its micro-batches do not gather: {exc}") from exc
    want, spec = pytree.tree_flatten(detached(whole))
    got, got_spec = pytree.tree_flatten(split)
    if spec != got_spec:
        raise _mixed(model, sizes, "the output structure changes with the batch")
    for k, (w, g) in enumerate(zip(want, got, strict=True)):
        problem = differs(w, g)
        if problem and isinstance(w, torch.Tensor) and w.dim() == 0:
            raise _reduced(model, sizes, reducer, f"output leaf {k} {problem}")
        if problem:
            raise _mixed(model, sizes, f"output leaf {k} {problem}")


def _check_gradients(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    whole: Any,
    parts: list[Any],
    sizes: Sequence[int],
) -> tuple[str, str] | None:
    """The outputs agree; the parameter gradients must too (a model can break that alone:
    timm's LeViT and XCiT give other gradients on one-row micro-batches, run unsplit too).
    The first parameter that differs and how, or None."""
    full = square_loss(whole, batched_only=True)
    split = square_loss(gather(parts, sizes, _skip), batched_only=True)
    if full is None or split is None:
        return None
    try:
        # retain: a model may cache a tensor with its graph across calls (timm's LeViT
        # keeps its attention biases in eval mode), which the second grad reads again
        want = torch.autograd.grad(full, params, allow_unused=True, retain_graph=True)
        got = torch.autograd.grad(split, params, allow_unused=True)
    except RuntimeError as exc:  # no backward to compare (the model's own limits)
        log.debug("batch independence: gradients not compared (%s)", exc)
        return None
    return gradient_difference(model, params, want, got)


def gradient_difference(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    want: Sequence[torch.Tensor | None],
    got: Sequence[torch.Tensor | None],
) -> tuple[str, str] | None:
    """The first of ``model``'s parameters that require grad (``params``) whose gradient
    in ``got`` differs from ``want`` (None: no gradient, as zeros), and how; or None."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    # Gradients are as small as the loss makes them (LeViT's reach 4e-6): compare each to
    # its own size, with a floor relative to the largest, not to a fixed ATOL.
    floor = GRAD_FLOOR * max((float(w.abs().max()) for w in want if w is not None), default=0)
    for name, p, w, g in zip(names, params, want, got, strict=True):
        if w is None and g is None:
            continue
        zero = torch.zeros_like(p)
        problem = differs(zero if w is None else w, zero if g is None else g, floor)
        if problem:
            return name, problem
    return None


def _cut_gradients(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    call: Any,
    pieces: list[Any],
    sizes: Sequence[int],
    problem: tuple[str, str],
    as_stages: Callable[[], contextlib.AbstractContextManager[Any]],
) -> ModelSplitError:
    """The error for gradients that differ on micro-batches; when they agree with oneDNN
    off, torch's oneDNN kernels are named as the cause, with that remedy."""
    name, how = problem
    cause = ""
    if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        with onednn_off():
            whole, parts = _runs(model, call, pieces, sizes, True, as_stages)
            with as_stages():
                again = _check_gradients(model, params, whole, parts, sizes)
        if again is None:
            threads = _threads_in(as_stages)
            cause = (
                f" (torch's oneDNN kernels compute them so at {threads} intra-op thread(s) "
                f"per stage, as the stages run; with torch.backends.mkldnn.enabled = False "
                f"they agree, at some speed)"
            )
    return MicroBatchError(
        f"{type(model).__name__}'s gradients depend on how the batch is cut: run as "
        f"{len(sizes)} micro-batches of {list(sizes)} rows its outputs agree with the whole "
        f"batch's, but the gradient of {name!r} {how}{cause}; use bigger micro-batches "
        f"(fewer chunks) or chunks=1",
        min(sizes),
    )


@contextlib.contextmanager
def onednn_off() -> Iterator[None]:
    """oneDNN off, for a run that tells whether it is the cause (torch warns about TF32 on
    Intel GPUs as it switches: not the user's business)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def _threads_in(as_stages: Callable[[], contextlib.AbstractContextManager[Any]]) -> int:
    with as_stages():
        return torch.get_num_threads()


def _warn_counters(model: nn.Module, before: dict[str, torch.Tensor], chunks: int) -> None:
    """Buffers a call updates (outside BatchNorm in training: a step counter, a cache) are
    updated once per micro-batch by the split model: said once, by name."""
    changed = [
        name
        for name, buf in model.named_buffers()
        if name in before
        and (buf.shape != before[name].shape or not torch.equal(buf, before[name]))
    ]
    if changed:
        warnings.warn(
            f"{type(model).__name__} updates buffer(s) {', '.join(map(repr, changed[:4]))} on "
            f"every call: the split model runs {chunks} micro-batches per call and updates them "
            f"once per micro-batch, so they will not match the unsplit model's; keep such "
            f"state outside the model, or use chunks=1",
            UserWarning,
            stacklevel=5,
        )


def _on_meta(model: nn.Module, call: Any) -> bool:
    tensors = [t for t in pytree.tree_leaves(call) if isinstance(t, torch.Tensor)]
    tensors += list(model.parameters())
    return any(t.is_meta for t in tensors)


def differs(whole: Any, split: Any, atol: float = ATOL) -> str | None:
    if isinstance(split, _Skip):
        return None
    if not isinstance(whole, torch.Tensor) or not isinstance(split, torch.Tensor):
        same = type(whole) is type(split) and bool(whole == split)
        return None if same else f"is {whole!r} for the whole batch but {split!r} in pieces"
    if whole.shape != split.shape:
        return (
            f"has shape {tuple(whole.shape)} for the whole batch but {tuple(split.shape)} "
            f"when its micro-batches are concatenated"
        )
    if not (whole.is_floating_point() or whole.is_complex()):
        return None if torch.equal(whole, split) else "has other values in pieces"
    w, s = whole.double(), split.double()
    scale = float(w.abs().max()) if w.numel() else 0.0
    diff = float((w - s).abs().max()) if w.numel() else 0.0
    if diff > atol + RTOL * scale or diff != diff:
        return f"differs by up to {diff:.3g} (its values reach {scale:.3g})"
    return None


def _mixed(model: nn.Module, sizes: Sequence[int], problem: str) -> ModelSplitError:
    return MicroBatchError(
        f"{type(model).__name__} mixes rows of the batch: run as {len(sizes)} micro-batches "
        f"of {list(sizes)} rows, as the pipeline runs it, {problem}. A split model would "
        f"return that silently; use chunks=1 (no micro-batching), or make every output row "
        f"depend on its own input row only (a statistic over the batch, a (B, B) similarity "
        f"matrix and a batch-sized reshape do not)",
        min(sizes),
        any_cut=True,
    )


def _reduced(
    model: nn.Module, sizes: Sequence[int], reducer: Any, problem: str
) -> ModelSplitError:
    return MicroBatchError(
        f"{type(model).__name__} returns a value with no batch dimension (a loss?) that "
        f"reducer={reducer!r} does not rebuild from {len(sizes)} micro-batches of "
        f"{list(sizes)} rows: {problem}. 'mean' weights micro-batches by rows, which is not "
        f"the model's own reduction when it is not a mean over rows (a token-level loss "
        f"with ignored labels, -100): pass reducer=runtime.token_mean('labels', shift=1) "
        f"(a causal LM's shifted labels; shift=0 otherwise), which weights micro-batches by "
        f"their counted tokens, or another reducer that rebuilds it, or use chunks=1",
        min(sizes),
        any_cut=True,
    )


def training_batch_norms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers that normalise with batch statistics (training mode)."""
    norms = (nn.modules.batchnorm._BatchNorm,)
    return [name for name, m in model.named_modules() if isinstance(m, norms) and m.training]


def warn_training_batch_norms(model: nn.Module, chunks: int, deferred: bool) -> None:
    """BatchNorm in training sees micro-batches (GPipe's semantics): said once, by name."""
    norms = training_batch_norms(model)
    if not norms or chunks < 2:
        return
    shown = ", ".join(norms[:4]) + (f" and {len(norms) - 4} more" if len(norms) > 4 else "")
    stats = (
        "deferred_batch_norm=True updates the running statistics once per call, but only "
        "the first layer's come out as the unsplit model's"
        if deferred
        else "the running statistics update once per micro-batch (deferred_batch_norm=True "
        "updates them once per call)"
    )
    warnings.warn(
        f"{type(model).__name__} trains BatchNorm layers ({shown}): each micro-batch is "
        f"normalised with its own statistics (GPipe's semantics), so outputs and gradients "
        f"differ from the unsplit model's; {stats}; put the model in eval mode or use chunks=1 "
        f"for the unsplit results",
        UserWarning,
        stacklevel=2,
    )


def warn_ignored_labels(kwargs: Mapping[str, Any], reducer: Any, chunks: int) -> bool:
    """A loss over labels with ignored positions (-100, Hugging Face's ``ignore_index``),
    combined with ``reducer="mean"``: weighted by rows, not by the tokens each micro-batch
    counts, so it is not the unsplit loss. Says so (once per caller); True if it did."""
    labels = kwargs.get("labels")
    if reducer != "mean" or chunks < 2 or not isinstance(labels, torch.Tensor):
        return False
    if not bool((labels == -100).any()):
        return False
    warnings.warn(
        "labels hold ignored positions (-100): reducer='mean' weights each micro-batch's "
        "loss by its rows, not by the tokens it counts, so the loss and its gradients differ "
        "from the unsplit model's where micro-batches count different tokens; "
        "reducer=runtime.token_mean('labels', shift=1) (a causal LM; shift=0 otherwise) "
        "weights them by counted tokens and is exact, or use chunks=1",
        UserWarning,
        stacklevel=3,
    )
    return True
