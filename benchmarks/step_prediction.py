"""Predicted against measured training step time, threaded runtime on CPU workers.

    .venv/bin/python benchmarks/step_prediction.py [--rounds 7 --devices 2 --chunks 4]

For three example models (an MLP, a small GPT, a residual CNN) and two schedules (gpipe,
1f1b), `ModelSplitter` plans the model in training mode on ``--devices`` CPU workers, exactly
as a user's call does: a training profile (forward and measured backward time per node, with
the intra-op threads each stage worker will get), then a training `solve` for that schedule
and ``--chunks`` micro-batches, whose ``plan.step_time`` is the simulated step. Then
`splitter.train_step` runs that plan ``--rounds`` times (after one warm-up step) and the
median is the measured step; the fastest is shown too, as the profile keeps each node's
fastest run (noise only adds time: [Note: timing on a busy machine]). A row prints them and
their ratios to the prediction; the issue's target is within 25% (a ratio in 0.75 .. 1.25).

What the simulation leaves out shows up as a ratio above 1: Python and queue overhead per
action, the loss, scatter and gather, and the gradients' zeroing. On this shared 2-core
machine the figures move by 15% between runs; the ratios move less, as both sides slow down
together only in part, so run it twice before reading much into one row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partitioner import ModelSplitter  # noqa: E402
from partitioner.examples import MODELS, example_input  # noqa: E402

#: name -> (factory config, input config, batch)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "mlp": ({"width": 1024, "depth": 8}, {"width": 1024}, 64),
    "gpt": ({"vocab": 512, "dim": 128, "layers": 4, "heads": 4}, {"vocab": 512, "seq": 64}, 16),
    "residual_cnn": ({"channels": 32, "blocks": 4}, {"size": 32}, 32),
}
SCHEDULES = ("gpipe", "1f1b")


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.float() - target).pow(2).mean()


def measure(name: str, schedule: str, args: argparse.Namespace) -> tuple[float, list[float], str]:
    """Predicted seconds per step, the measured steps and the plan's split, for one model x
    schedule."""
    config, inputs, batch = CASES[name]
    torch.manual_seed(0)
    model = MODELS[name](**config).train()
    (x,), _ = example_input(name, batch, **inputs)
    with torch.no_grad():
        target = torch.randn_like(model(x).float())
    devices = [f"cpu:{k}" for k in range(args.devices)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm per micro-batch: GPipe's semantics
        splitter = ModelSplitter(
            model,
            devices=devices,
            chunks=args.chunks,
            schedule=schedule,
            example_inputs=(x,),
            time_limit=10,
        )
        plan = splitter.plan
        assert plan.step_time is not None, "a training profile gives a training plan"
        splitter.train_step(x, target=target, loss_fn=loss_fn)  # warm-up
        times = []
        for _ in range(args.rounds):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            splitter.train_step(x, target=target, loss_fn=loss_fn)
            times.append(time.perf_counter() - t0)
    split = " + ".join(str(s.nodes) for s in plan.stages)
    return float(plan.step_time), times, f"{plan.num_stages} ({split} nodes)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--only", choices=sorted(CASES), action="append")
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, {args.devices} CPU workers, {args.chunks} micro-batches, "
        f"median of {args.rounds} steps\n"
    )
    print(
        "| model | schedule | stages | predicted (ms) | measured, median (ms) | median / "
        "predicted | measured, fastest (ms) | fastest / predicted |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    ratios: dict[str, list[float]] = {"median": [], "fastest": []}
    for name in args.only or list(CASES):
        for schedule in SCHEDULES:
            predicted, times, stages = measure(name, schedule, args)
            median, fastest = statistics.median(times), min(times)
            ratios["median"].append(median / predicted)
            ratios["fastest"].append(fastest / predicted)
            print(
                f"| {name} | {schedule} | {stages} | {1e3 * predicted:.1f} | "
                f"{1e3 * median:.1f} | {median / predicted:.2f} | {1e3 * fastest:.1f} | "
                f"{fastest / predicted:.2f} |",
                flush=True,
            )
    print()
    for how, rs in ratios.items():
        inside = sum(0.75 <= r <= 1.25 for r in rs)
        print(f"{how}: {inside} of {len(rs)} within 25%; geometric mean ratio "
              f"{statistics.geometric_mean(rs):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
