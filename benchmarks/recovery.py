"""Recovery benchmark: lose one of four devices in the middle of a call of a GPT.

    .venv/bin/python benchmarks/recovery.py            # ~30 s on 2 cores

A GPT (examples/models.py: 4 layers, width 128, tied LM head) is split over four devices
(CPU workers without four GPUs) with ``on_failure="replan"``. Each round puts the four
devices back (`ModelSplitter.revive`), then makes the device of one stage fail as it starts
a middle micro-batch (`runtime.recovery.drill.inject_failure`) and times:

- re-plan: solve on the three survivors from the cached CostGraph, re-split, re-place;
- the recovered call, end to end (failure, re-plan, re-run of the unfinished micro-batches),
  against a call with no failure on four devices and a call on the three survivors;
- the same for a training step (forward and backward).

The recovered call includes the first call on the freshly split stages, which pays one-off
costs that the steady-state columns (after a warm-up call) do not.

Medians over ``--rounds``. Trace and profile run once, before the rounds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partitioner import ModelSplitter  # noqa: E402
from partitioner.examples import gpt  # noqa: E402
from runtime.recovery.drill import inject_failure  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--stage", type=int, default=1, help="the stage whose device fails")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=5.0)
    ap.add_argument("-v", "--verbose", action="store_true", help="log each re-plan's phases")
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s"
    )

    torch.manual_seed(0)
    model = gpt(vocab=512, dim=args.dim, layers=args.layers, heads=4, max_len=args.seq)
    ids = torch.randint(0, 512, (args.batch, args.seq))
    t0 = time.perf_counter()
    split = ModelSplitter(
        model,
        4,
        chunks=args.chunks,
        example_inputs=(ids,),
        on_failure="replan",
        time_limit=args.time_limit,
    )
    compile_s = time.perf_counter() - t0
    plan = split.plan
    assert plan is not None
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"GPT {args.layers} layers x {args.dim}, {params / 1e6:.1f} MB of weights, batch "
        f"{args.batch} x {args.seq}, {args.chunks} micro-batches; trace+profile+solve "
        f"{compile_s:.1f}s; {plan.num_stages} stages on {', '.join(plan.devices)}"
    )
    if not 0 <= args.stage < plan.num_stages:
        raise SystemExit(f"--stage must be in 0..{plan.num_stages - 1}")
    middle = args.chunks // 2

    def infer() -> None:
        with torch.no_grad():
            split(ids)

    def train() -> None:
        split(ids).float().pow(2).mean().backward()

    rows = []
    for name, step in (("inference", infer), ("training", train)):
        step()  # warm-up
        normal, recovered, after, replan, rerun = [], [], [], [], []
        for _ in range(args.rounds):
            split.revive()
            step()  # the first call on fresh stages pays one-off costs
            normal.append(timed(step))
            with inject_failure(split, stage=args.stage, microbatch=middle):
                recovered.append(timed(step))
            record = split.recoveries[-1]
            replan.append(record.replan_s)
            rerun.append(len(record.rerun))
            after.append(timed(step))
            model.zero_grad(set_to_none=True)
        rows.append((name, normal, recovered, after, replan, rerun))

    dead = split.failed_devices
    print(f"device failed: {', '.join(dead)} (stage {args.stage}, micro-batch {middle})")
    print(
        f"{'':<10} {'4 devices':>10} {'recovered':>10} {'3 devices':>10} {'re-plan':>9} "
        f"{'re-run':>7}"
    )
    for name, normal, recovered, after, replan, rerun in rows:
        med = statistics.median
        print(
            f"{name:<10} {1e3 * med(normal):>8.1f}ms {1e3 * med(recovered):>8.1f}ms "
            f"{1e3 * med(after):>8.1f}ms {1e3 * med(replan):>7.1f}ms "
            f"{med(rerun):>4.0f}/{args.chunks}"
        )
    print(
        "re-plan = solve on the survivors from the cached CostGraph + re-split + re-place; "
        "recovered = the whole call that met the failure"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
