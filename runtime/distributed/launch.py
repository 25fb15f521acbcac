"""Command line of `runtime.distributed`: one process per stage, launched by torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node=3 -m runtime.distributed \\
        examples/models.py:mlp --plan plan.json --input-shape 32,64 --chunks 4 --check

Every rank builds the model from the same seed, makes the same random inputs,
loads the plan (or rank 0 solves one and sends it to the others), runs the
schedule and, with ``--check``, compares with the unsplit model on its own
rank. An error on any rank exits that process at once with status 1 and no
collective call (torchrun then stops the others; a rank left waiting gives up
after ``--timeout`` seconds).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves

from partitioner.errors import ModelSplitError
from runtime.distributed import SCHEDULES, DistributedPipeline, split_for_ranks
from runtime.distributed.placement import LOOPED, check_schedule

log = logging.getLogger("runtime.distributed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torch.distributed.run ... -m runtime.distributed",
        description="Run a modelsplit plan on torch.distributed.pipelining (one rank per stage).",
    )
    p.add_argument("model", metavar="MODEL", help="path/to/file.py:factory or pkg.mod:factory")
    p.add_argument("--factory-kwargs", metavar="JSON", help="keyword arguments of the factory")
    p.add_argument(
        "--input-shape",
        action="append",
        required=True,
        metavar="SHAPE",
        help="shape of one positional input, batch first (repeat per input), e.g. 32,64",
    )
    p.add_argument(
        "--dtype",
        action="append",
        metavar="DTYPE",
        help="float32, int64, int64:N (integers in [0, N)); once for all or once per input",
    )
    p.add_argument("--kwargs", metavar="JSON", help="keyword arguments of forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--plan", help="plan JSON (default: rank 0 solves one for the world size)")
    p.add_argument("--save-plan", metavar="PATH", help="where rank 0 writes the plan it solved")
    p.add_argument("--bandwidth", help="link bandwidth when solving, e.g. 12.5GB/s")
    p.add_argument("--chunks", type=int, required=True, metavar="M", help="micro-batches")
    p.add_argument(
        "--schedule",
        choices=tuple(SCHEDULES),
        help="the pipeline schedule (default: the plan's, else gpipe)",
    )
    p.add_argument(
        "--virtual-stages",
        type=int,
        metavar="V",
        help="stages per rank, for interleaved-1f1b and zero-bubble: rank r runs stages "
        "r, r+K, ... of K*V (default: the plan's, else 1)",
    )
    p.add_argument("--iters", type=int, default=10, help="timed iterations (after one warm-up)")
    p.add_argument("--train", action="store_true", help="forward and backward with an MSE loss")
    p.add_argument("--check", action="store_true", help="compare with the unsplit model")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of --check")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of --check")
    p.add_argument("--timeout", type=float, default=60.0, help="process group timeout, seconds")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    return p


def _get_plan(
    args: argparse.Namespace, model: nn.Module, call: tuple[Any, Any], world: int
) -> Any:
    """The plan of ``--plan``, or one rank 0 solves for ``world * V`` stages. Fills in
    ``--schedule`` and ``--virtual-stages`` first, and checks them before solving."""
    from partitioner.planner.plan import Plan

    plan = Plan.load(args.plan) if args.plan else None
    _schedule_of(args, plan)
    if plan is not None:
        return plan
    v = args.virtual_stages
    check_schedule(args.schedule, world, world * v, args.chunks, v)
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        from partitioner import auto_partition
        from partitioner.planner.cost import DEFAULT_BANDWIDTH, parse_bytes

        bandwidth = DEFAULT_BANDWIDTH if args.bandwidth is None else parse_bytes(args.bandwidth)
        plan = auto_partition(
            model, call[0], call[1], num_devices=world * v, chunks=args.chunks, bandwidth=bandwidth
        )
        if args.save_plan:
            plan.save(args.save_plan)
        box[0] = plan.to_dict()
    # Profiled times differ between processes: one rank solves, all use its plan.
    dist.broadcast_object_list(box, src=0)
    plan = Plan.from_dict(box[0])
    if plan.num_stages != world * v:
        raise ModelSplitError(
            f"the planner used {plan.num_stages} of {world * v} stages (the model is too small "
            f"to gain from more): launch {plan.num_stages // v or 1} processes, or pass a --plan "
            f"with {world * v} stages"
        )
    return plan


def _max_err(out: Any, ref: Any) -> tuple[float, float]:
    """Largest absolute error over the tensor leaves, and the largest reference value."""
    pairs = [
        (a.detach().cpu().double(), b.detach().cpu().double())
        for a, b in zip(tree_leaves(out), tree_leaves(ref), strict=True)
        if isinstance(b, torch.Tensor)
    ]
    err = max((float((a - b).abs().max()) for a, b in pairs if b.numel()), default=0.0)
    scale = max((float(b.abs().max()) for _, b in pairs if b.numel()), default=0.0)
    return err, scale


def _loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """MSE of the model's first output leaf against a fixed random target."""
    return nn.functional.mse_loss(tree_leaves(out)[0], target)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    from partitioner.loader import build_inputs, input_specs, load_model, parse_json

    world = dist.get_world_size()
    torch.manual_seed(0)  # same weights on every rank, whatever the factory does
    model = load_model(args.model, parse_json(args.factory_kwargs, "--factory-kwargs")).eval()
    call = build_inputs(
        input_specs(args.input_shape, args.dtype or ()),
        parse_json(args.kwargs, "--kwargs"),
        seed=args.seed,
    )
    plan = _get_plan(args, model, call, world)
    ref = _Reference(model, call, device) if args.check or args.train else None
    stages = split_for_ranks(model, call[0], call[1], plan)
    pipe = DistributedPipeline(
        stages,
        call,
        chunks=args.chunks,
        schedule=args.schedule,
        virtual_stages=args.virtual_stages,
        loss_fn=_loss if args.train else None,
        device=device,
    )
    del stages
    target = ref.target if ref is not None and pipe.is_last else None
    feed: tuple[Any, ...] = call[0] if pipe.is_first else ()
    kwargs: dict[str, Any] = call[1] if pipe.is_first else {}

    def step() -> Any:
        if not args.train:
            return pipe(*feed, **kwargs)
        for p in pipe.parameters():
            p.grad = None
        return pipe.train_step(*feed, target=target, **kwargs)

    ok = True
    if args.check and ref is not None:
        ok = _check_forward(args, pipe, ref, pipe(*feed, **kwargs))
    result = step()  # warm-up: the engine sets up its buffers on the first call
    if args.check and args.train and ref is not None:
        ok = _check_grads(args, pipe, model, ref) and ok
    del result
    _time_steps(args, step, call, world, pipe.is_last)
    return 0 if ok else 1


def _schedule_of(args: argparse.Namespace, plan: Any) -> None:
    """Fill in ``--schedule`` and ``--virtual-stages`` from the plan where not given (no
    plan, or one without these fields: gpipe, one stage per rank)."""
    if args.schedule is None:
        args.schedule = getattr(plan, "schedule", None) or "gpipe"
    if args.virtual_stages is None:
        v = getattr(plan, "virtual_stages", None)
        args.virtual_stages = v if isinstance(v, int) and args.schedule in LOOPED else 1
    if args.schedule not in SCHEDULES:
        raise ValueError(
            f"the plan's schedule {args.schedule!r} is not one this backend runs: pass "
            f"--schedule {'|'.join(SCHEDULES)}"
        )


def _time_steps(args: argparse.Namespace, step: Any, call: Any, world: int, report: bool) -> None:
    """Run ``args.iters`` steps between barriers; the last rank prints the throughput."""
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    dist.barrier()
    dt = time.perf_counter() - t0
    if report and args.iters:
        batch = next(x.shape[0] for x in tree_leaves(call) if isinstance(x, torch.Tensor))
        mode = "train" if args.train else "forward"
        v = f" x {args.virtual_stages} stages" if args.virtual_stages > 1 else ""
        print(
            f"{world} ranks{v}, {args.schedule}, {args.chunks} chunks, {mode}: "
            f"{args.iters * batch / dt:.1f} samples/s ({1e3 * dt / args.iters:.2f} ms/iter)",
            flush=True,
        )


class _Reference:
    """The unsplit model's output (and, for training, gradients) on this rank.

    A deep copy on this rank's device, made before the stages move their
    weights; gradients come from ``autograd.grad``, so no ``.grad`` is touched.
    """

    def __init__(self, model: nn.Module, call: tuple[Any, Any], device: torch.device) -> None:
        self.model = copy.deepcopy(model).to(device)
        args = [_to(x, device) for x in call[0]]
        kwargs = {k: _to(v, device) for k, v in call[1].items()}
        self.output = self.model(*args, **kwargs)
        first = tree_leaves(self.output)[0]
        gen = torch.Generator().manual_seed(4321)
        self.target = torch.randn(first.shape, generator=gen, dtype=first.dtype).to(device)

    def grads(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        loss = _loss(self.output, self.target)
        grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        return {
            name: torch.zeros_like(p) if g is None else g
            for (name, p), g in zip(named.items(), grads, strict=True)
        }


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _check_forward(
    args: argparse.Namespace, pipe: DistributedPipeline, ref: _Reference, out: Any
) -> bool:
    """Print ``max abs err`` of the output on the last rank; False there on a mismatch."""
    if not pipe.is_last:
        return True
    err, scale = _max_err(out, ref.output)
    print(f"max abs err {err:.3g}", flush=True)
    return bool(err <= float(args.atol) + float(args.rtol) * scale)


def _check_grads(
    args: argparse.Namespace, pipe: DistributedPipeline, model: nn.Module, ref: _Reference
) -> bool:
    """Each rank compares its stage's gradients; the worst error (MAX over ranks) is
    printed on the last rank and decides on every rank."""
    names = {id(p): n for n, p in model.named_parameters()}
    want = ref.grads()
    err, scale = 0.0, 0.0
    for p in pipe.parameters():
        name = names.get(id(p))
        if name is None:  # a tensor the tracer lifted, not one of the model's parameters
            continue
        w = want[name]
        got = torch.zeros_like(w) if p.grad is None else p.grad
        e, sc = _max_err(got, w)
        err, scale = max(err, e), max(scale, sc)
    both = torch.tensor([err, scale], dtype=torch.float64, device=pipe.device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    err, scale = float(both[0]), float(both[1])
    if pipe.is_last:
        print(f"max abs err {err:.3g} (gradients, {pipe.num_stages} stages)", flush=True)
    return bool(err <= float(args.atol) + float(args.rtol) * scale)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=os.environ.get("MODELSPLIT_LOG", "WARNING"),
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    cuda = torch.cuda.is_available() and args.backend != "gloo"
    backend = "nccl" if cuda else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
        code = _run(args, device)
    except Exception as e:  # report and leave at once: no barrier, no hang
        log.debug("rank %s failed", rank, exc_info=True)  # MODELSPLIT_LOG=DEBUG shows it
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"rank {rank}: error: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
