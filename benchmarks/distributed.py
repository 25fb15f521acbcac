"""Threaded runtime vs torch.distributed.pipelining: same machine, split and micro-batches.

    .venv/bin/python benchmarks/distributed.py [--width 1024 --depth 8 --batch 64 --chunks 4]

Plans one split of ``examples/models.py:mlp`` for 2 stages, then times it two
ways with one intra-op thread per stage: `runtime.Pipeline` (two worker threads
in this process) and `runtime.distributed` under torchrun (two gloo processes
on 127.0.0.1). Prints a Markdown table of samples/s (medians of ``--repeats``
alternating rounds) and the ratio distributed / threaded, forward and training step;
training with both of the threaded runtime's backward modes (autograd on the calling
thread, and ``backward="pipelined"``: each stage's backward in its own worker) and with
`Pipeline.train_step` under GPipe and 1F1B, against the distributed backend's same schedule.

A CPU `Pipeline` and a CPU rank of `runtime.distributed` set glibc's malloc to keep freed
memory ([Note: CPU allocator] in runtime/allocator.py). The gloo ranks run with glibc's
defaults (``MODELSPLIT_MALLOC=system``), as torch.distributed.pipelining runs under a plain
torchrun, and in the last two rows with the settings runtime.distributed gives itself, for a
like-for-like figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gloo import samples_per_second  # noqa: E402  (benchmarks/gloo.py)

from partitioner import auto_partition  # noqa: E402
from partitioner.examples import mlp  # noqa: E402
from partitioner.planner.plan import Plan  # noqa: E402
from runtime import Pipeline  # noqa: E402
from runtime.distributed import split_for_ranks  # noqa: E402


def threaded(
    args: argparse.Namespace,
    plan: Plan,
    train: bool,
    backward: str = "autograd",
    schedule: str | None = None,
) -> float:
    """samples/s of runtime.Pipeline over the plan's stages (one thread each); with a
    ``schedule``, training steps through `Pipeline.train_step`."""
    torch.manual_seed(0)
    model = mlp(width=args.width, depth=args.depth).eval()
    x = torch.randn(args.batch, args.width)
    stages = split_for_ranks(model, (x,), {}, plan)
    pipe = Pipeline(
        stages, ["cpu"] * len(stages), chunks=args.chunks, threads=1, backward=backward
    )
    target = torch.randn(args.batch, args.width)

    def step() -> None:
        if schedule is not None:
            for p in model.parameters():
                p.grad = None
            pipe.train_step(x, target=target, loss_fn=nn.functional.mse_loss, schedule=schedule)
        elif train:
            for p in model.parameters():
                p.grad = None
            nn.functional.mse_loss(pipe(x), target).backward()
        else:
            with torch.no_grad():
                pipe(x)

    step()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    return args.iters * args.batch / (time.perf_counter() - t0)


def distributed(
    args: argparse.Namespace,
    plan_path: str,
    train: bool,
    schedule: str = "gpipe",
    keep_freed: bool = False,
) -> float:
    """samples/s of runtime.distributed, 2 gloo ranks on 127.0.0.1 (one thread each); with
    ``keep_freed``, under the malloc settings it gives itself as the threaded runtime does,
    else with glibc's defaults (MODELSPLIT_MALLOC=system)."""
    launch = [
        "examples/models.py:mlp", "--factory-kwargs",
        f'{{"width": {args.width}, "depth": {args.depth}}}', "--plan", plan_path,
        "--input-shape", f"{args.batch},{args.width}", "--chunks", str(args.chunks),
        "--iters", str(args.iters), *(["--train", "--schedule", schedule] if train else []),
    ]  # fmt: skip
    return samples_per_second(2, launch, {} if keep_freed else {"MODELSPLIT_MALLOC": "system"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="rounds of each; medians reported")
    args = p.parse_args()
    torch.manual_seed(0)
    model = mlp(width=args.width, depth=args.depth).eval()
    x = torch.randn(args.batch, args.width)
    plan = auto_partition(model, (x,), num_devices=2, chunks=args.chunks)
    if plan.num_stages != 2:
        raise SystemExit(f"the planner used {plan.num_stages} stage(s); try a wider model")
    torch.set_num_threads(1)
    print(
        f"mlp width {args.width} depth {args.depth}, batch {args.batch}, {args.chunks} "
        f"micro-batches, 2 stages (cut {plan.stages[0].last} | {plan.stages[1].first}), "
        f"1 thread per stage, {args.iters} iterations\n"
    )
    print("| step | threaded runtime (samples/s) | torch.distributed.pipelining, gloo "
          "(samples/s) | distributed / threaded (per round) |")  # fmt: skip
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = os.path.join(tmp, "plan.json")
        plan.save(plan_path)
        rows = [
            ("forward", False, "autograd", None, "gpipe", False),
            ("forward + backward (GPipe), backward='autograd'", True, "autograd", None, "gpipe",
             False),
            ("forward + backward (GPipe), backward='pipelined'", True, "pipelined", None,
             "gpipe", False),
            ("train_step, schedule='gpipe'", True, "autograd", "gpipe", "gpipe", False),
            ("train_step, schedule='1f1b'", True, "autograd", "1f1b", "1f1b", False),
            ("train_step, schedule='gpipe'; gloo ranks keep freed memory too", True,
             "autograd", "gpipe", "gpipe", True),
            ("train_step, schedule='1f1b'; gloo ranks keep freed memory too", True,
             "autograd", "1f1b", "1f1b", True),
        ]  # fmt: skip
        for name, train, backward, schedule, theirs, keep in rows:
            # Alternate the two, several rounds, and keep the medians: a shared machine's
            # load drifts between runs.
            rounds = [
                (
                    threaded(args, plan, train, backward, schedule),
                    distributed(args, plan_path, train, theirs, keep),
                )
                for _ in range(args.repeats)
            ]
            a = statistics.median(r[0] for r in rounds)
            b = statistics.median(r[1] for r in rounds)
            ratios = ", ".join(f"{d / t:.2f}" for t, d in rounds)
            print(f"| {name} | {a:.0f} | {b:.0f} | {b / a:.2f} ({ratios}) |", flush=True)


if __name__ == "__main__":
    main()
