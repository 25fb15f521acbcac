"""``modelsplit run``: check and time a saved plan against the unsplit model."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

from partitioner.cli.common import (
    Setup,
    fit_chunks,
    load_setup,
    parse_devices,
    parse_model_options,
)
from partitioner.cli.output import Output
from partitioner.cli.render import fmt_time
from partitioner.errors import ModelSplitError, PlanError
from partitioner.loader import UsageError
from partitioner.planner.plan import Plan

__all__ = ["check_devices", "max_error", "run_plan", "train_loss"]


def max_error(output: Any, reference: Any) -> float:
    """Largest absolute difference over the tensor leaves of two outputs."""
    import torch
    import torch.utils._pytree as pytree

    got, want = pytree.tree_leaves(output), pytree.tree_leaves(reference)
    if len(got) != len(want):
        raise ModelSplitError(
            f"the split model returns {len(got)} values where the model returns {len(want)}"
        )
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape:
                raise ModelSplitError(
                    f"the split model returns shape {tuple(a.shape)} where the model "
                    f"returns {tuple(b.shape)}"
                )
            if a.numel():
                worst = max(worst, _largest_difference(a, b))
        elif a != b:
            worst = float("inf")
    return worst


def _largest_difference(a: Any, b: Any) -> float:
    """Max |a - b|, where NaN beside NaN (and inf beside the same inf) is no difference
    and NaN beside a number is an infinite one."""
    import torch

    x, y = a.detach().cpu().double(), b.detach().cpu().double()
    same = (x == y) | (torch.isnan(x) & torch.isnan(y))
    diff = torch.where(same, torch.zeros_like(x), (x - y).abs())
    return float(torch.nan_to_num(diff, nan=float("inf")).max())


def _close(output: Any, reference: Any, rtol: float, atol: float) -> bool:
    import torch
    import torch.utils._pytree as pytree

    for a, b in zip(pytree.tree_leaves(output), pytree.tree_leaves(reference), strict=True):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            a, b = a.detach().cpu(), b.detach().cpu()
            if a.is_floating_point() or b.is_floating_point():
                if not torch.allclose(a.double(), b.double(), rtol, atol, equal_nan=True):
                    return False
            elif not torch.equal(a, b):
                return False
    return True


def check_devices(names: list[str]) -> None:
    """Fail early, with the fix, when a device the plan names does not exist here."""
    from partitioner.devices import missing_gpu

    found = missing_gpu(names)
    if found is not None:
        name, gpus = found
        cpus = ",".join(f"cpu:{k}" for k in range(len(names)))
        raise PlanError(
            f"the plan runs a stage on {name} but this machine has {gpus} GPU(s); "
            f"run it on CPU workers with --devices {cpus}"
        )


def _check_plan_fits(plan: Plan, setup: Setup) -> None:
    name = type(setup.model).__name__
    if plan.model and plan.model != name:
        raise PlanError(
            f"plan field 'model' is {plan.model!r} but MODEL builds a {name}: this plan was "
            f"made for another model; re-plan with `modelsplit plan`"
        )


def _signature_note(plan: Plan, setup: Setup) -> str | None:
    """A warning when the inputs differ from the plan's beyond the batch size."""
    from partitioner.capture.tracer import input_signature

    def strip(signature: list[Any]) -> list[Any]:
        return [dict(e, shape=e["shape"][1:]) if "shape" in e else e for e in signature]

    now = input_signature(setup.args, setup.kwargs)
    if not plan.signature or strip(plan.signature) == strip(now):
        return None
    return (
        "warning: the plan was made for other inputs (plan field 'signature'); it runs, "
        "but its predicted figures may not hold: re-plan for these shapes"
    )


def _timed(fn: Callable[[], Any], iters: int) -> tuple[Any, float]:
    start = time.perf_counter()
    result = None
    for _ in range(iters):
        result = fn()
    return result, time.perf_counter() - start


def _load_plan(args: argparse.Namespace) -> Plan:
    """The plan file, on the devices of --devices when given (checked before torch loads)."""
    if args.iters < 1 or args.warmup < 0:
        raise UsageError(f"--iters must be >= 1 and --warmup >= 0 ({args.iters}, {args.warmup})")
    if args.chunks is not None and args.chunks < 1:
        raise UsageError(f"--chunks {args.chunks}: need at least one micro-batch")
    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name} {value:g}: give a tolerance >= 0, e.g. --{name} 1e-4")
    parse_model_options(args)
    plan = Plan.load(args.plan)
    if plan.virtual_stages > 1:
        raise PlanError(
            f"the plan puts {plan.virtual_stages} stages on each device ({plan.schedule}); "
            "`modelsplit run` runs one stage per device: re-plan with --virtual-stages 1"
        )
    if args.devices:
        devices = parse_devices(args.devices)
        if len(devices) != plan.num_devices:
            raise PlanError(
                f"plan field 'devices' lists {plan.num_devices} device(s) "
                f"({', '.join(plan.device_names)}) but --devices names {len(devices)}: pass "
                f"{plan.num_devices} devices or re-plan with --devices {len(devices)}"
            )
        plan = plan.on_devices(devices)
    check_devices(plan.devices)
    return plan


def _timeline(splitter: Any, setup: Setup, iters: int) -> tuple[Any, float]:
    """Run ``iters`` recorded iterations; return the Timeline and the seconds they took."""
    from runtime.timeline import Timeline

    timeline = Timeline(splitter.stages, splitter.devices)
    pipeline = splitter.pipeline
    if getattr(pipeline, "on_task", False) is None:  # exact micro-batch indices
        pipeline.on_task = timeline.note_task
    with timeline.recording():
        start = time.perf_counter()
        for _ in range(iters):
            with timeline.iteration():
                splitter(*setup.args, **setup.kwargs)
        seconds = time.perf_counter() - start
    return timeline, seconds


def run_plan(args: argparse.Namespace, out: Output) -> int:
    """Run a saved plan on random inputs, check it against the model, and time both."""
    plan = _load_plan(args)
    import torch

    from partitioner.splitter import ModelSplitter

    chunks = args.chunks or plan.chunks
    with out.progress(4) as step, torch.no_grad():
        step(f"loading {args.model}")
        setup = load_setup(args)
        _check_plan_fits(plan, setup)
        chunks = fit_chunks(setup, chunks, args.chunks is not None, out)
        note = _signature_note(plan, setup)
        if note:
            out.note(note)
        step("running the unsplit model")

        def call() -> Any:
            return setup.model(*setup.args, **setup.kwargs)

        reference, _ = _timed(call, max(1, args.warmup))
        _, unsplit_s = _timed(call, args.iters)
        step(f"splitting into {plan.num_stages} stages")
        splitter = ModelSplitter.from_plan(
            setup.model, plan, devices=list(plan.device_specs), chunks=chunks
        )
        output = splitter(*setup.args, **setup.kwargs)
        error = max_error(output, reference)
        ok = _close(output, reference, args.rtol, args.atol)
        step(f"running {args.iters} iterations")
        _timed(lambda: splitter(*setup.args, **setup.kwargs), args.warmup)
        timeline, split_s = _timeline(splitter, setup, args.iters)
    result = {
        "model": type(setup.model).__name__,
        "devices": splitter.devices,
        "stages": len(splitter.stages),
        "chunks": splitter.chunks,
        "batch_size": setup.batch,
        "iters": args.iters,
        "max_error": error,
        "ok": ok,
        "throughput": setup.batch * args.iters / split_s,
        "unsplit_throughput": setup.batch * args.iters / unsplit_s,
        "time_per_batch": split_s / args.iters,
        "busy": timeline.busy(),
        "trace": args.trace,
    }
    if args.trace:
        timeline.save(args.trace)
    if args.train:
        with out.progress(1) as step:
            step(f"training steps, backward={args.backward!r}")
            result["train"] = _train(args, setup, plan, chunks)
    _report(result, out)
    _check_result(result, args)
    return 0


def _check_result(result: dict[str, Any], args: argparse.Namespace) -> None:
    """A split whose outputs or gradients differ from the model's is an error (exit 1)."""
    if not result["ok"]:
        raise ModelSplitError(
            f"the split model's output differs from the model's (max error "
            f"{result['max_error']:.3g}, rtol {args.rtol:g}, atol {args.atol:g}); report it "
            f"with `--debug` output"
        )
    if args.train and not result["train"]["ok"]:
        raise ModelSplitError(
            f"the split model's gradients differ from the model's (max error "
            f"{result['train']['max_grad_error']:.3g}, rtol {args.rtol:g}, atol {args.atol:g}); "
            f"report it with `--debug` output"
        )


def train_loss(output: Any) -> Any:
    """The loss ``modelsplit run --train`` differentiates: the mean square of every floating
    output tensor, summed (a scalar output, such as a model's own loss, counts as is)."""
    import torch
    import torch.utils._pytree as pytree

    terms = [
        leaf.float().pow(2).mean()
        for leaf in pytree.tree_leaves(output)
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.requires_grad
    ]
    if not terms:
        raise ModelSplitError(
            "--train: the model's outputs carry no gradient (no floating output depends on a "
            "parameter that requires grad)"
        )
    return torch.stack(terms).sum()


def _train(args: argparse.Namespace, setup: Setup, plan: Plan, chunks: int) -> dict[str, Any]:
    """Check a training step's gradients against the unsplit model's, and time both.

    Runs in eval mode (no dropout: the split and unsplit runs would draw different masks;
    BatchNorm uses its running statistics, since micro-batches see other batch statistics).
    Scalar outputs are combined over micro-batches with reducer="mean".
    """
    from partitioner.splitter import ModelSplitter

    model = setup.model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(run: Callable[..., Any]) -> None:
        for p in params:
            p.grad = None
        train_loss(run(*setup.args, **setup.kwargs)).backward()

    def grads() -> list[Any]:
        return [None if p.grad is None else p.grad.detach().clone() for p in params]

    step(model)
    want = grads()
    splitter = ModelSplitter.from_plan(
        model,
        plan,
        devices=list(plan.device_specs),
        chunks=chunks,
        reducer="mean",
        backward=args.backward,
    )
    step(splitter)
    got = grads()
    error, ok = 0.0, True
    for g, w in zip(got, want, strict=True):
        if g is None or w is None:
            ok = ok and (g is None or not g.any()) and (w is None or not w.any())
            continue
        error = max(error, max_error(g, w))
        ok = ok and _close(g, w, args.rtol, args.atol)
    _timed(lambda: step(model), args.warmup)
    _, unsplit_s = _timed(lambda: step(model), args.iters)
    _timed(lambda: step(splitter), args.warmup)
    _, split_s = _timed(lambda: step(splitter), args.iters)
    for p in params:
        p.grad = None
    return {
        "backward": args.backward,
        "max_grad_error": error,
        "ok": ok,
        "throughput": setup.batch * args.iters / split_s,
        "unsplit_throughput": setup.batch * args.iters / unsplit_s,
    }


def _report(r: dict[str, Any], out: Output) -> None:
    out.data(r)
    check = "ok" if r["ok"] else "MISMATCH"
    speedup = r["throughput"] / r["unsplit_throughput"] if r["unsplit_throughput"] else 0.0
    lines = [
        ("model", f"{r['model']} on {', '.join(r['devices'])}"),
        ("schedule", f"{r['chunks']} micro-batches of a batch of {r['batch_size']}"),
        ("max error", f"{r['max_error']:.3g} ({check})"),
        (
            "throughput",
            f"{r['throughput']:,.1f} samples/s ({fmt_time(r['time_per_batch'])}/batch)",
        ),
        ("unsplit", f"{r['unsplit_throughput']:,.1f} samples/s (split: {speedup:.2f}x)"),
        ("stage busy", ", ".join(f"{100 * b:.0f}%" for b in r["busy"])),
    ]
    if r["trace"]:
        lines.append(("trace", f"{r['trace']} (open in https://ui.perfetto.dev)"))
    if "train" in r:
        t = r["train"]
        check = "ok" if t["ok"] else "MISMATCH"
        ratio = t["throughput"] / t["unsplit_throughput"] if t["unsplit_throughput"] else 0.0
        lines += [
            ("grad error", f"{t['max_grad_error']:.3g} ({check}; backward={t['backward']!r})"),
            (
                "training",
                f"{t['throughput']:,.1f} samples/s, unsplit {t['unsplit_throughput']:,.1f} "
                f"({ratio:.2f}x)",
            ),
        ]
    for label, value in lines:
        out.show(f"[bold]{label:>11}[/bold]  {value}")
