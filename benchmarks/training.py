"""Training step on CPU stages: serial vs backward="autograd" vs backward="pipelined".

    .venv/bin/python benchmarks/training.py [--batch 256 --chunks 4 --rounds 7]
    MALLOC_TRIM_THRESHOLD_=268435456 MALLOC_MMAP_THRESHOLD_=268435456 \\
        .venv/bin/python benchmarks/training.py          # glibc keeps freed memory

An 8-layer, 1024-wide MLP (Linear + GELU) split 4 + 4 over two "cpu" stages with one
intra-op thread each, mean-squared-error loss, ``--chunks`` micro-batches. Three ways to
run one forward + backward + zeroed gradients:

- serial: the micro-batches one after another on one thread (loss / chunks each);
- backward="autograd": the pipeline's forward, then autograd's backward, which on the CPU
  runs every stage's backward on the calling thread;
- backward="pipelined": each stage's backward in its own worker, micro-batches pipelined
  ([Note: pipelined backward] in runtime/backward.py).

Rounds alternate the three; medians are printed with the page faults per step. Memory
the worker threads allocate comes from glibc's per-thread arenas, which return freed memory
to the OS eagerly, so every step touches fresh pages: run it a second time with the MALLOC_*
variables above to see what that costs (the README's table has both).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import Pipeline  # noqa: E402


def half(width: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())])


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    a, b = half(args.width, 4), half(args.width, 4)
    params = [*a.parameters(), *b.parameters()]
    x, target = torch.randn(args.batch, args.width), torch.randn(args.batch, args.width)
    torch.set_num_threads(1)

    def serial() -> None:
        for xs, ts in zip(x.chunk(args.chunks), target.chunk(args.chunks), strict=True):
            (nn.functional.mse_loss(b(a(xs)), ts) * xs.shape[0] / args.batch).backward()

    def piped(backward: str) -> Callable[[], None]:
        pipe = Pipeline([a, b], ["cpu", "cpu"], chunks=args.chunks, threads=1, backward=backward)
        return lambda: nn.functional.mse_loss(pipe(x), target).backward()

    runs = {
        "serial, one thread": serial,
        "pipeline, backward='autograd'": piped("autograd"),
        "pipeline, backward='pipelined'": piped("pipelined"),
    }
    grads: dict[str, list[torch.Tensor]] = {}
    for name, step in runs.items():  # warm up, and check all three agree
        for p in params:
            p.grad = None
        step()
        grads[name] = [p.grad.clone() for p in params if p.grad is not None]
    for got in grads.values():
        for g, want in zip(got, grads["serial, one thread"], strict=True):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)

    times: dict[str, list[float]] = {name: [] for name in runs}
    pages: dict[str, list[int]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, step in runs.items():
            for p in params:
                p.grad = None
            f0, t0 = faults(), time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            pages[name].append(faults() - f0)
    base = times["serial, one thread"]
    print(
        f"MLP 8x{args.width}, batch {args.batch}, {args.chunks} micro-batches, 2 cpu stages x "
        f"1 thread, torch {torch.__version__}, median of {args.rounds} rounds"
    )
    print(f"{'training step':<34} {'ms':>8} {'speed-up':>9} {'page faults':>12}")
    for name in runs:
        ratio = statistics.median(s / t for s, t in zip(base, times[name], strict=True))
        print(
            f"{name:<34} {statistics.median(times[name]) * 1e3:>8.1f} {ratio:>8.2f}x "
            f"{statistics.median(pages[name]):>12.0f}"
        )


if __name__ == "__main__":
    main()
