"""The split model against the unsplit one, on the example, through the real pipeline.

[Note: verifying the split]
The batch-independence check ([Note: batch independence]) runs the *unsplit* model on
micro-batches. What users run is the pipeline: each stage in its worker thread with its own
intra-op threads, its inputs crossing stage boundaries, its backward where the runtime puts
it. torch's CPU kernels do not always give the same answer there: with torch 2.14.1 and
oneDNN, ResNet-50 and ReXNet on one-row micro-batches got parameter gradients 2-6% off
(the float64 model agrees with the unsplit float32 one to 4e-7), in both backward modes,
and only with their stages in the pipeline for ReXNet, so no check of the unsplit model can
stand in for it. So `ModelSplitter`, once its pipeline is built, runs the example through
it and through the unsplit model: outputs, and the parameter gradients of
``sum(mean(out ** 2))`` (models up to 1 GiB of parameters), compared as the batch check
compares them. A difference is a `ModelSplitError` naming the leaf or parameter; when the
same run with oneDNN off agrees, the error names oneDNN and its switch.

It runs again on the first call whose micro-batches are smaller than any verified so far (a
smaller batch that splits into one-row micro-batches, where oneDNN went wrong), on that
call's own inputs: at most once per new smallest size (`verify_smaller`), and on the first
call after a re-plan off a lost device (a new split).

Only for models in eval mode on CPU-only pipelines: a training-mode graph may draw random
numbers (dropout), which micro-batches draw in another order, and GPU stages hold the
model's own parameters on several devices, where the unsplit model cannot run. The model's
buffers, plain attributes, RNG streams and ``.grad`` are left as they were.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from partitioner.capture.batching import differs, gradient_difference, onednn_off
from partitioner.capture.checks import (
    GRAD_CHECK_BYTES,
    GRADS_OFF_KEY,
    batch_size,
    fresh,
    preserved_state,
    square_loss,
)
from partitioner.errors import MicroBatchError
from runtime.microbatch import capped

__all__ = ["smallest_microbatch", "verify_compiled", "verify_smaller", "verify_split"]


def smallest_microbatch(args: Sequence[Any], kwargs: Mapping[str, Any], pipeline: Any) -> int:
    """Rows of the call's smallest micro-batch (as ``pipeline`` splits it)."""
    call = (tuple(args), dict(kwargs))
    b = batch_size(*call) or 1
    return b // max(1, min(capped(call, pipeline.chunks, pipeline.min_rows), b))


def _gradients(compiled: Any) -> bool:
    """Whether the gradients of ``compiled`` are compared: not for a graph kept for
    inference only (an fx graph without a model's ``no_grad`` block)."""
    return compiled.gm is None or GRADS_OFF_KEY not in compiled.gm.meta


def verify_compiled(
    model: nn.Module, compiled: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> None:
    """`verify_split` on a freshly built ``compiled`` with the call that planned it; the
    smallest micro-batch it verified is kept on it for `verify_smaller`."""
    if verify_split(model, compiled.pipeline, args, kwargs, _gradients(compiled)):
        compiled.verified = smallest_microbatch(args, kwargs, compiled.pipeline)


def verify_smaller(
    model: nn.Module, compiled: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> None:
    """`verify_split` on this call when its micro-batches are smaller than any verified
    so far on ``compiled`` (one that was verified at all): [Note: verifying the split]."""
    if compiled.verified is None:
        return
    smallest = smallest_microbatch(args, kwargs, compiled.pipeline)
    if smallest < compiled.verified:
        on = f"this call (its micro-batches of {smallest} row(s) are the smallest yet)"
        verify_split(model, compiled.pipeline, args, kwargs, _gradients(compiled), on)
        compiled.verified = smallest


def verify_split(
    model: nn.Module,
    pipeline: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    gradients: bool = True,
    on: str = "the example",
) -> bool:
    """Raise `ModelSplitError` when ``pipeline`` gives other outputs or (with
    ``gradients``: not for a graph kept for inference only) gradients than ``model`` on
    the example ([Note: verifying the split]); False when it does not verify this model
    (training mode, GPU stages)."""
    if model.training or not pipeline._transfer.cpu_only:
        return False
    params = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() * p.element_size() for p in params)
    grads = gradients and bool(params) and size <= GRAD_CHECK_BYTES
    problem = _compare(model, pipeline, args, kwargs, params, grads)
    if problem is None:
        return True
    cause = ""
    if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        with onednn_off():
            again = _compare(model, pipeline, args, kwargs, params, grads)
        if again is None:
            cause = (
                "; with oneDNN off (torch.backends.mkldnn.enabled = False) they agree: "
                "torch's oneDNN kernels compute them differently on these micro-batches "
                "in the stages' threads"
            )
    raise MicroBatchError(
        f"the split {type(model).__name__} does not match the unsplit model on {on}: "
        f"{problem}{cause}; use bigger micro-batches (fewer chunks) or chunks=1"
        + (", or turn oneDNN off" if cause else ""),
        smallest_microbatch(args, kwargs, pipeline),
    )


def _compare(
    model: nn.Module,
    pipeline: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    params: Sequence[torch.Tensor],
    grads: bool,
) -> str | None:
    """How the pipeline's outputs or gradients differ from the model's, or None."""
    with preserved_state(model), torch.enable_grad() if grads else torch.no_grad():
        # each run on its own copy: a model may write to its input (x.mul_(2))
        want_out = model(*fresh(args), **fresh(kwargs))
        got_out = pipeline(*fresh(args), **fresh(kwargs))
        want, spec = pytree.tree_flatten(want_out)
        got, got_spec = pytree.tree_flatten(got_out)
        if spec != got_spec:
            return "the output structure differs"
        for k, (w, g) in enumerate(zip(want, got, strict=True)):
            if isinstance(w, torch.Tensor) and isinstance(g, torch.Tensor):
                how = differs(w.detach(), g.detach())
                if how:
                    return f"output leaf {k} {how}"
        if not grads:
            return None
        full, split = square_loss(want_out, batched_only=True), square_loss(got_out, True)
        if full is None or split is None:
            return None
        try:
            want_g = torch.autograd.grad(full, params, allow_unused=True)
            got_g = torch.autograd.grad(split, params, allow_unused=True)
        except RuntimeError:  # no backward to compare (the model's own limits)
            return None
    found = gradient_difference(model, params, want_g, got_g)
    return None if found is None else f"the gradient of {found[0]!r} {found[1]}"
