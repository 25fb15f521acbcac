"""Checks that a traced module is faithful to its model: names, and outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from partitioner.capture.binding import run_program
from partitioner.capture.state import preserved_attributes
from partitioner.errors import TraceError

__all__ = [
    "CHECK_ROWS",
    "batch_size",
    "check_gradients",
    "check_outputs",
    "fresh",
    "preserved_state",
    "sync_state_dict",
]

CHECK_ROWS = 2  # outputs are compared on this many rows of the example batch
Args = tuple[Any, ...]
Kwargs = dict[str, Any]
T = TypeVar("T")


def batch_size(args: Args, kwargs: Kwargs) -> int | None:
    """The batch size of the call: dim 0 of the first tensor with a dim 0 above 1, else 1
    when some tensor has a dim 0, else None. Size-1 tensors beside a larger batch broadcast
    ([Note: micro-batching rules] in `runtime.microbatch`)."""
    sizes = [
        int(leaf.shape[0])
        for leaf in pytree.tree_leaves((args, kwargs))
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1
    ]
    return next((size for size in sizes if size > 1), sizes[0] if sizes else None)


def sync_state_dict(model: nn.Module, gm: fx.GraphModule) -> None:
    """Make ``gm.state_dict()`` keys equal the model's (fx drops unused tensors and
    registers non-persistent buffers as persistent); other differences are errors."""
    want = set(model.state_dict())
    have = set(gm.state_dict())
    buffers = dict(model.named_buffers())
    for name in sorted(have - want):
        if name not in buffers:
            raise TraceError(f"the traced module has {name!r}, which the model does not")
        owner, _, leaf = name.rpartition(".")
        gm.get_submodule(owner)._non_persistent_buffers_set.add(leaf)
    for name in sorted(want - set(gm.state_dict())):
        _copy_attr(model, gm, name)
    if set(gm.state_dict()) != want:
        raise TraceError("the traced module's state_dict keys differ from the model's")


def _copy_attr(src: nn.Module, dst: nn.Module, name: str) -> None:
    *path, leaf = name.split(".")
    for part in path:
        src = getattr(src, part)
        if not isinstance(getattr(dst, part, None), nn.Module):
            dst.add_module(part, nn.Module())
        dst = getattr(dst, part)
    value = getattr(src, leaf)
    if isinstance(value, nn.Parameter):
        dst.register_parameter(leaf, value)
    else:
        dst.register_buffer(leaf, value)


def _is_meta(model: nn.Module, args: Args, kwargs: Kwargs) -> bool:
    tensors = [*model.parameters(), *model.buffers(), *pytree.tree_leaves((args, kwargs))]
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Run code that calls ``module`` without leaving a trace: its buffers (BatchNorm
    statistics, step counters) are put back afterwards, even on an error, and the RNG
    stream is forked (the CPU's, and those of the CUDA devices holding its buffers)."""
    saved = {name: buf.detach().clone() for name, buf in module.named_buffers() if not buf.is_meta}
    devices = sorted({b.device.index or 0 for b in saved.values() if b.device.type == "cuda"})
    # a model's plain attributes too (a GraphModule's are its own): [Note: plain attributes]
    plain: Any = contextlib.nullcontext()
    if not isinstance(module, fx.GraphModule):
        plain = preserved_attributes(module)
    try:
        with torch.random.fork_rng(devices=devices), plain:
            yield
    finally:
        with torch.no_grad():
            for name, buf in module.named_buffers():
                old = saved.get(name)
                if old is not None and old.shape == buf.shape:
                    buf.copy_(old)


def _rows(args: Args, kwargs: Kwargs, rows: int) -> tuple[Args, Kwargs]:
    """The first ``rows`` rows of every batched tensor (dim 0 equal to the batch size)."""
    batch = batch_size(args, kwargs)
    if batch is None or batch <= rows:
        return args, kwargs

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[:rows] if t.dim() >= 1 and t.shape[0] == batch else t

    return pytree.tree_map_only(torch.Tensor, cut, (args, kwargs))


class ModelFailed(Exception):
    """The model itself raised on the example call (eagerly, before any graph ran)."""


def _both(model: nn.Module, gm: fx.GraphModule, args: Args, kwargs: Kwargs) -> str | None:
    """How the graph's output, or the inputs it leaves, differ from the model's; or None.
    Each runs on its own copy of the inputs: a model that writes to its input (``x.mul_(2)``)
    must not change the other run's or the caller's, and the graph must write what the model
    writes ([Note: writes to model inputs])."""
    mine, theirs = fresh((args, kwargs)), fresh((args, kwargs))
    with torch.no_grad(), preserved_state(model):
        torch.manual_seed(0)
        try:
            expected = model(*mine[0], **mine[1])
        except Exception as exc:
            raise ModelFailed(f"{type(exc).__name__}: {first_line(exc)}") from exc
        torch.manual_seed(0)
        actual = run_program(gm, *theirs)
    problem = _difference(expected, actual)
    written = _difference(mine, theirs) if problem is None else None
    return (
        problem if written is None else f"the inputs it leaves differ from the model's: {written}"
    )


def fresh(tree: T) -> T:
    """``tree`` with every tensor cloned."""
    return pytree.tree_map_only(torch.Tensor, torch.clone, tree)


def check_outputs(model: nn.Module, gm: fx.GraphModule, args: Args, kwargs: Kwargs) -> None:
    """The traced module must give the model's outputs on the example's first
    `CHECK_ROWS` rows: this checks, cheaply, that it also runs at another batch size.
    On `meta`, where there are no values and the model may not run eagerly, it must run."""
    if _is_meta(model, args, kwargs):
        to_meta = (args, kwargs)
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), to_meta)
        with torch.no_grad():
            run_program(gm, args, kwargs)
        return
    few = _rows(args, kwargs, CHECK_ROWS)
    try:
        problem = _both(model, gm, *few)
    except ModelFailed:  # the model itself needs the full batch: compare on that
        problem = _both(model, gm, args, kwargs)
        few = (args, kwargs)
    if problem is None:
        return
    batch, rows = batch_size(args, kwargs), batch_size(*few)
    if rows != batch and _both(model, gm, args, kwargs) is None:
        raise TraceError(
            f"the traced graph matches the model at the example's {batch} rows but not at "
            f"{rows} ({problem}): the model's control flow depends on the batch size (such "
            f"as `if x.shape[0] > 4`), which the graph fixes at {batch}, and micro-batches "
            f"have other sizes; take the branch from something other than the batch size"
        )
    raise TraceError(problem)


def _difference(expected: Any, actual: Any) -> str | None:
    """How the traced module's output differs from the model's, or None."""
    want, want_spec = pytree.tree_flatten(expected)
    got, got_spec = pytree.tree_flatten(actual)
    if want_spec != got_spec:
        return f"output structure differs: model {want_spec}, traced {got_spec}"
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        try:
            if isinstance(w, torch.Tensor) and isinstance(g, torch.Tensor):
                torch.testing.assert_close(g, w, equal_nan=True)
            elif type(w) is not type(g) or w != g:
                raise AssertionError(f"{g!r} != {w!r}")
        except AssertionError as exc:
            return f"output leaf {i} differs: {first_line(exc)}"
    return None


def check_gradients(model: nn.Module, gm: fx.GraphModule, args: Args, kwargs: Kwargs) -> None:
    """The traced module's parameter gradients must be the model's, on the example's first
    `CHECK_ROWS` rows, for the loss sum(mean(output ** 2)) over its floating outputs.

    fx does not record autograd contexts: ``torch.no_grad()`` or ``torch.enable_grad()``
    inside forward vanish from the graph, which then trains parameters the model does not
    (or the other way round) with outputs that match. A mismatch is a TypeError naming the
    first parameter, so ``mode="auto"`` moves on to export, which records them. `trace`
    runs it for models in training mode only: an eval-mode model is planned for inference,
    where such a graph is right, and its gradients could double its memory.
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or _is_meta(model, args, kwargs):
        return
    call = _rows(args, kwargs, CHECK_ROWS)
    try:
        want = _grads(model, params, lambda a, k: model(*a, **k), call)
    except Exception:  # the model needs the full batch (check_outputs said it runs)
        call = (args, kwargs)
        try:
            want = _grads(model, params, lambda a, k: model(*a, **k), call)
        except Exception:  # no backward in eager mode either (an in-place op autograd
            return  # rejects): there are no gradients to hold the graph to
    try:
        got = _grads(model, params, lambda a, k: run_program(gm, a, k), call)
    except Exception as exc:
        raise TypeError(
            f"the traced graph's backward fails where the model's runs: "
            f"{type(exc).__name__}: {first_line(exc)}; trace with mode='export'"
        ) from exc
    nothing: Grads = (None,) * len(names)
    for name, w, g in zip(names, want or nothing, got or nothing, strict=True):
        w_zero = w is None or not bool(w.any())
        g_zero = g is None or not bool(g.any())
        if w_zero and g_zero:
            continue
        if w_zero != g_zero or not torch.allclose(g, w, rtol=1e-3, atol=1e-5):  # type: ignore[arg-type]
            raise TypeError(
                f"the traced graph's gradient of {name!r} differs from the model's: forward "
                f"may use torch.no_grad() or torch.enable_grad(), which fx does not record; "
                f"trace with mode='export'"
            )


Grads = tuple[torch.Tensor | None, ...]


def _grads(
    model: nn.Module, params: Sequence[torch.Tensor], run: Any, call: tuple[Args, Kwargs]
) -> Grads | None:
    """Parameter gradients of sum(mean(output ** 2)) over ``run(*call)``'s floating outputs
    (None when no output needs a gradient), leaving the model's state as it was."""
    with torch.enable_grad(), preserved_state(model):
        torch.manual_seed(0)
        loss = square_loss(run(*call))
        return None if loss is None else torch.autograd.grad(loss, params, allow_unused=True)


def square_loss(out: Any, batched_only: bool = False) -> torch.Tensor | None:
    """sum(mean(leaf ** 2)) over the floating output leaves that need a gradient (with
    ``batched_only``, those with a batch dimension); None when there are none."""
    leaves = [
        leaf
        for leaf in pytree.tree_leaves(out)
        if isinstance(leaf, torch.Tensor)
        and leaf.is_floating_point()
        and leaf.requires_grad
        and (leaf.dim() > 0 or not batched_only)
    ]
    return torch.stack([leaf.float().pow(2).mean() for leaf in leaves]).sum() if leaves else None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


#: eval-mode models with more parameter bytes skip the gradient check
GRAD_CHECK_BYTES = 1 << 30

#: gm.meta key: why backward through this graph would give the wrong gradients (eval mode)
GRADS_OFF_KEY = "modelsplit_gradients_off"


def gradients_off(
    model: nn.Module, gm: fx.GraphModule, args: Args, kwargs: Kwargs
) -> fx.GraphModule | None:
    """Training: gradients that differ are a failure of fx (export is tried). Eval mode is
    planned for inference, where the graph is right, but gradients through it would be
    silently wrong: return the graph, marked, for use if export fails too."""
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > GRAD_CHECK_BYTES
    if big and not model.training:
        return None  # its gradients would double its memory: planned for inference
    try:
        check_gradients(model, gm, args, kwargs)
    except TypeError as exc:
        if model.training:
            raise
        gm.meta[GRADS_OFF_KEY] = (
            f"{first_line(exc)}; the fx graph is kept for inference only: a backward through "
            f"it raises (put the model in training mode, or trace with mode='export')"
        )
        return gm
    return None


class _GradientsOff(torch.autograd.Function):
    """Identity forward; its backward raises: see `guard_backward`."""

    @staticmethod
    def forward(ctx: Any, reason: str, t: torch.Tensor) -> torch.Tensor:
        ctx.reason = reason
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise TraceError(ctx.reason)


def guard_backward(output: Any, reason: str) -> Any:
    """``output`` whose backward raises ``TraceError(reason)``: a graph right for inference
    but not for gradients (an fx graph without the model's no_grad blocks) says so."""

    def guard(t: torch.Tensor) -> torch.Tensor:
        return _GradientsOff.apply(reason, t) if t.requires_grad else t

    return pytree.tree_map_only(torch.Tensor, guard, output)
