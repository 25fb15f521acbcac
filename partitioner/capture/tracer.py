"""Capture a model as a torch.fx graph that reproduces its outputs.

Two capture modes, tried in order by ``mode="auto"``:

- ``"fx"``: `torch.fx` symbolic tracing. Module-level nodes (a `Linear` is one
  ``call_module`` node), user leaf modules honoured, non-tensor arguments
  baked in as constants. In-place ops become data flow (`partitioner.capture.inplace`);
  fails on data-dependent control flow and on in-place ops that mutate a view,
  an input or a parameter (export handles those).
- ``"export"``: ``torch.export.export(strict=False)`` then ``.module()``.
  Operator-level aten nodes; handles Hugging Face models (``use_cache=False``)
  and shape-dependent control flow. Dim 0 of every batched tensor input is
  exported as ``Dim.AUTO``, so the graph runs at any micro-batch size.

Either way the result carries a `runtime.interface.Program` in
``gm.meta["modelsplit_program"]`` (see `partitioner.capture.binding`) and the example
inputs' signature in ``gm.meta["modelsplit_signature"]``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.fx._pytree import tree_flatten_spec

from partitioner.capture.binding import (
    PROGRAM_KEY,
    SIGNATURE_KEY,
    ExportBinder,
    FxBinder,
    describe_call,
    input_signature,
    output_program,
    program_of,
)
from partitioner.capture.checks import (
    GRADS_OFF_KEY,
    ModelFailed,
    batch_size,
    check_outputs,
    first_line,
    gradients_off,
    sync_state_dict,
)
from partitioner.capture.inplace import functionalize_inplace, persist_input_writes
from partitioner.capture.names import graph_names, mark_renamed, renamed_root
from partitioner.capture.state import frozen_constants, preserved_attributes
from partitioner.errors import InputError, TraceError
from runtime.interface import Program

__all__ = ["MODES", "input_signature", "program_of", "trace"]

logger = logging.getLogger(__name__)

MODES = ("auto", "fx", "export")
LeafSpec = type[nn.Module] | str
Args = tuple[Any, ...]
Kwargs = dict[str, Any]

REMEDY = (
    "Remedy: mark the submodule with data-dependent control flow as a leaf "
    "(trace(..., leaf_modules=[ThatModule or 'its.qualified.name'], mode='fx')), or give "
    "example inputs that take the path you want traced (export specialises on them); "
    "Hugging Face models need use_cache=False in their config."
)


def trace(
    model: nn.Module,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    leaf_modules: Sequence[LeafSpec] = (),
    mode: str = "auto",
) -> fx.GraphModule:
    """Trace ``model`` on the example call ``model(*example_inputs, **example_kwargs)``.

    Returns a GraphModule whose parameters and buffers keep the model's qualified names
    (its ``state_dict`` keys equal the model's; a top-level name GraphModule uses itself,
    such as ``meta``, is held under a free one: [Note: clashing names]) and whose outputs
    match the model's on the example. ``leaf_modules`` (types or qualified names) apply to
    ``"fx"``. Raises `TraceError` naming each mode's failure and the remedy.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
    args: Args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs: Kwargs = dict(example_kwargs or {})
    root, renamed = renamed_root(model)  # [Note: clashing names]
    leaves = graph_names(renamed, leaf_modules)
    with preserved_attributes(model):  # [Note: plain attributes]
        return mark_renamed(_trace(root, args, kwargs, leaves, mode), renamed)


def _trace(
    model: nn.Module, args: Args, kwargs: Kwargs, leaf_modules: Sequence[LeafSpec], mode: str
) -> fx.GraphModule:
    modes = ("fx", "export") if mode == "auto" else (mode,)
    causes: list[tuple[str, BaseException]] = []
    fallback: fx.GraphModule | None = None  # an eval-mode fx graph whose gradients are off
    for name in modes:
        try:
            gm = _TRACERS[name](model, args, kwargs, leaf_modules)
            _drop_unused_items(gm)
            sync_state_dict(model, gm)
            check_outputs(model, gm, args, kwargs)
            if name == "fx":  # fx drops contexts such as no_grad()
                fallback = gradients_off(model, gm, args, kwargs)
                if fallback is not None:
                    causes.append((name, ValueError(gm.meta[GRADS_OFF_KEY])))
                    continue
        except ModelFailed as exc:  # no way of tracing helps a model that cannot run
            raise InputError(
                f"{type(model).__name__} fails on the inputs {describe_call(args, kwargs)}: "
                f"{exc}. Check the inputs' shapes and dtypes against what the model expects"
            ) from exc
        except Exception as exc:
            logger.debug("trace %s: %s failed", type(model).__name__, name, exc_info=True)
            causes.append((name, exc))
            continue
        if GRADS_OFF_KEY in gm.meta:
            logger.warning("%s: %s", type(model).__name__, gm.meta[GRADS_OFF_KEY])
        return _traced(gm, model, name, args, kwargs)
    if fallback is not None:  # right for inference; a backward through it raises
        logger.warning("%s: %s", type(model).__name__, fallback.meta[GRADS_OFF_KEY])
        return _traced(fallback, model, "fx", args, kwargs)
    lines = [f"could not trace {type(model).__name__}:"]
    lines += [f"  {name}: {type(exc).__name__}: {first_line(exc)}" for name, exc in causes]
    raise TraceError("\n".join([*lines, REMEDY])) from causes[-1][1]


def _traced(
    gm: fx.GraphModule, model: nn.Module, mode: str, args: Args, kwargs: Kwargs
) -> fx.GraphModule:
    """``gm`` with what it was traced from: the call's signature, the model, mode and tracer."""
    gm.meta[SIGNATURE_KEY] = input_signature(args, kwargs)
    gm.meta["modelsplit_model"] = type(model).__name__
    gm.meta["modelsplit_training"] = model.training
    gm.meta["modelsplit_mode"] = mode
    logger.debug("traced %s with %s: %d nodes", type(model).__name__, mode, len(gm.graph.nodes))
    return gm


def _drop_unused_items(gm: fx.GraphModule) -> None:
    """Remove tuple items nobody reads (``out, _ = attention(x)``): left in, the planner
    could cut between the tuple and the item used, and the whole tuple would cross."""
    dead = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is operator.getitem and not n.users
    ]
    for n in reversed(dead):
        gm.graph.erase_node(n)
    if dead:
        gm.recompile()
        logger.debug("dropped %d unused tuple items", len(dead))


def _set_meta(gm: fx.GraphModule, program: Program) -> fx.GraphModule:
    if not isinstance(getattr(gm, "meta", None), dict):
        gm.meta = {}
    gm.meta[PROGRAM_KEY] = program
    return gm


# --- fx ----------------------------------------------------------------------------------------


class _LeafTracer(fx.Tracer):
    """A tracer that keeps the user's leaf modules (by type or qualified name) opaque."""

    def __init__(self, leaves: Sequence[LeafSpec]) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf for leaf in leaves if isinstance(leaf, type))
        self.leaf_names = {leaf for leaf in leaves if isinstance(leaf, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace_fx(
    model: nn.Module, args: Args, kwargs: Kwargs, leaves: Sequence[LeafSpec]
) -> fx.GraphModule:
    signature = inspect.signature(model.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        raise TypeError("forward takes *args or **kwargs, which symbolic tracing cannot bind")
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    constants: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor):
            continue
        if any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value)):
            raise TypeError(f"argument {name!r} nests tensors in a {type(value).__name__}")
        constants[name] = value
    tracer = _LeafTracer(leaves)
    saved = _buffer_values(model)
    try:
        graph = tracer.trace(model, concrete_args=dict(constants))
    except fx.proxy.TraceError as exc:
        raise _where_control_flow(model, tracer, exc) from exc
    finally:
        changed = _restore_buffers(model, saved)
    if changed:
        raise TypeError(
            f"forward changes buffer(s) {changed} (e.g. a step counter): fx runs that update "
            f"once while tracing and records none of it; trace with mode='export'"
        )
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _drop_constant_placeholders(gm, set(bound.arguments) - set(constants))
    rewritten = functionalize_inplace(gm)  # [Note: in-place ops]; TypeError: use export
    if rewritten:
        logger.debug("%s: %d in-place ops made data flow", type(model).__name__, rewritten)
    placeholders = tuple((str(n.target), n.name) for n in gm.graph.nodes if n.op == "placeholder")
    binder = FxBinder(signature, placeholders, tuple(constants.items()))
    leaves_, unflatten = output_program(gm)
    program = Program(tuple(ph for _, ph in placeholders), leaves_, binder, unflatten)
    return _set_meta(gm, program)


def _where_control_flow(model: nn.Module, tracer: fx.Tracer, exc: Exception) -> TraceError:
    """fx's control-flow error, with the submodule it happened in: the one to keep whole."""
    stack = [path for path in getattr(tracer, "module_stack", {}) if path]
    if not stack:
        where = f"in {type(model).__name__}.forward itself, so no submodule can be kept whole"
    else:
        path, sub = stack[-1], type(model.get_submodule(stack[-1])).__name__
        where = (
            f"in submodule {path!r} ({sub}): trace(..., leaf_modules=[{path!r}], mode='fx') "
            f"keeps it whole, on one stage"
        )
    return TraceError(f"{first_line(exc)} {where}")


def _buffer_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buf.detach().clone()
        for name, buf in model.named_buffers()
        if not buf.is_meta and buf.numel() <= 1 << 24
    }


def _restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> list[str]:
    """Put back the buffers tracing changed; return their names."""
    changed = []
    with torch.no_grad():
        for name, buf in model.named_buffers():
            old = saved.get(name)
            if old is not None and (old.shape != buf.shape or not torch.equal(old, buf)):
                changed.append(name)
                if old.shape == buf.shape:
                    buf.copy_(old)
    return changed


_GUARDS = {operator.eq, torch._assert, fx._symbolic_trace._assert_is_none}


def _drop_constant_placeholders(gm: fx.GraphModule, tensor_args: set[str]) -> None:
    """Remove the placeholders fx makes for concrete args, with the asserts that guard them.

    The binder checks those values on every call instead, so the graph's inputs
    are exactly the tensors that flow through it.
    """
    for ph in [n for n in gm.graph.nodes if n.op == "placeholder" and n.target not in tensor_args]:
        doomed: list[fx.Node] = []
        frontier = [ph]
        while frontier:
            node = frontier.pop()
            doomed.append(node)
            frontier.extend(node.users)
        if all(n.op == "call_function" and n.target in _GUARDS for n in doomed[1:]):
            for node in sorted(set(doomed), key=_position(gm), reverse=True):
                gm.graph.erase_node(node)
        else:
            raise TypeError(f"constant argument {ph.target!r} flows into the computation")
    gm.graph.lint()
    gm.recompile()


def _position(gm: fx.GraphModule) -> Callable[[fx.Node], int]:
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return index.__getitem__


# --- export ------------------------------------------------------------------------------------


def _dynamic_shapes(signature: inspect.Signature, args: Args, kwargs: Kwargs) -> Any:
    """``{0: Dim.AUTO}`` for every tensor whose dim 0 is the batch size, None elsewhere."""
    batch = batch_size(args, kwargs)

    auto = getattr(torch.export.Dim, "AUTO", None)  # torch >= 2.6

    def spec(leaf: Any) -> Any:
        if auto is None:
            return None
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == batch:
            return {0: auto}
        return None

    return pytree.tree_map(spec, dict(signature.bind(*args, **kwargs).arguments))


# A failed export logs warnings and prints its partial graph to stderr; trace reports the
# failure itself (a TraceError with each mode's cause), so that is noise unless debugging.
# What a successful export writes to stderr is passed on.
_EXPORT_LOGGERS = (
    "torch.fx.experimental.symbolic_shapes",
    "torch._dynamo",
    "torch.export",
    "torch._subclasses.fake_tensor",  # logs an op's traceback at ERROR when its meta fails
)


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        logger.debug("export wrote to stderr: %s", captured.getvalue())
        raise
    else:
        sys.stderr.write(captured.getvalue())
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _trace_export(
    model: nn.Module, args: Args, kwargs: Kwargs, leaves: Sequence[LeafSpec]
) -> fx.GraphModule:
    if leaves:
        logger.debug("leaf_modules do not apply to export; %s ignored", list(leaves))
    if batch_size(args, kwargs) == 1:
        logger.warning(
            "%s: example batch size 1 makes torch.export specialise dim 0 to 1; "
            "trace with a batch of 2 or more to run other (micro-)batch sizes",
            type(model).__name__,
        )
    signature: inspect.Signature | None = inspect.signature(model.forward)
    dynamic: Any = None
    try:
        dynamic = _dynamic_shapes(inspect.signature(model.forward), args, kwargs)
    except TypeError:  # forward signature hidden behind a wrapper: export decides
        signature = None
    with _quiet_torch_export():
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
    try:  # the guard node would read every input: the binder checks constants instead
        gm = ep.module(check_guards=False)
    except TypeError:  # torch < 2.9 has no guard node
        gm = ep.module()
    writes = persist_input_writes(gm)  # [Note: writes to model inputs]
    functionalize_inplace(gm)  # export keeps add_, copy_, relu_: [Note: in-place ops]
    frozen = frozen_constants(model, dict(ep.constants))  # [Note: plain attributes]
    if frozen:
        gm.meta[GRADS_OFF_KEY] = (
            f"the model keeps {', '.join(frozen[:3])}{' and more' if len(frozen) > 3 else ''}: "
            f"a tensor computed from its parameters in a plain attribute (a cache), which the "
            f"exported graph holds as a constant, so those parameters would get no gradient "
            f"through it; the graph is kept for inference only: a backward through it raises "
            f"(clear the cache or call the model in training mode before planning, or make "
            f"it a buffer recomputed in forward)"
        )
    in_spec = gm._in_spec
    out_spec = gm._out_spec
    placeholders = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    flat = tree_flatten_spec((args, kwargs), in_spec)
    constants = tuple((i, v) for i, v in enumerate(flat) if not isinstance(v, torch.Tensor))
    binder = ExportBinder(signature, in_spec, placeholders, constants)
    leaves_, unflatten = output_program(gm, out_spec)
    leaves_ += tuple(final for _, final in writes)  # unflatten reads only the output's own
    return _set_meta(gm, Program(placeholders, leaves_, binder, unflatten, writes))


_TRACERS: dict[str, Callable[[nn.Module, Args, Kwargs, Sequence[LeafSpec]], fx.GraphModule]] = {
    "fx": _trace_fx,
    "export": _trace_export,
}
