"""Training step on CPU stages: serial, call + backward, and train_step with each schedule.

    .venv/bin/python benchmarks/training.py [--batch 256 --chunks 4 --rounds 7]
    MODELSPLIT_MALLOC=system .venv/bin/python benchmarks/training.py   # glibc's defaults

An 8-layer, 1024-wide MLP (Linear + GELU) split 4 + 4 over two "cpu" stages with one
intra-op thread each, mean-squared-error loss, ``--chunks`` micro-batches. Ways to run one
forward + backward + zeroed gradients:

- serial: the micro-batches one after another on one thread (loss / chunks each);
- backward="autograd": the pipeline's forward, then autograd's backward, which on the CPU
  runs every stage's backward on the calling thread;
- backward="pipelined": each stage's backward in its own worker, micro-batches pipelined
  ([Note: pipelined backward] in runtime/backward.py);
- train_step with each schedule ([Note: training step] in runtime/executor.py): gpipe, 1f1b
  and zero-bubble on the two stages, interleaved-1f1b on four stages of 2 layers, two per
  device (virtual_stages=2).

Rounds alternate the ways; medians are printed with the page faults per step and the peak
heap: the most bytes malloc had handed out above the step's start (glibc's ``mallinfo2``, all
arenas and mmapped blocks, sampled every millisecond in steps of their own, not timed; the
gradients are freed before every step, so each step allocates them again). A CPU `Pipeline`
sets glibc's malloc to keep freed memory ([Note: CPU allocator] in runtime/allocator.py);
with ``MODELSPLIT_MALLOC=system`` every step touches fresh pages, as before it did: run it
both ways to see what that costs.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import Pipeline  # noqa: E402

_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS.split()]  # noqa: SIM905


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _Mallinfo2


def half(width: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())])


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def heap() -> int:
    """Bytes malloc has handed out and not taken back, all arenas and mmapped blocks (glibc)."""
    info = _LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class PeakHeap:
    """The most heap bytes in use above the start, sampled every millisecond in a thread."""

    def __enter__(self) -> PeakHeap:
        self.start = self.peak = heap()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, heap())

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, heap())

    @property
    def above(self) -> int:
        return self.peak - self.start


def ways(args: argparse.Namespace, a: nn.Sequential, b: nn.Sequential) -> dict[str, Any]:
    """name -> (schedule shown, one training step)."""
    x, target = torch.randn(args.batch, args.width), torch.randn(args.batch, args.width)
    mse = nn.functional.mse_loss

    def serial() -> None:
        for xs, ts in zip(x.chunk(args.chunks), target.chunk(args.chunks), strict=True):
            (mse(b(a(xs)), ts) * xs.shape[0] / args.batch).backward()

    def piped(backward: str) -> Callable[[], None]:
        pipe = Pipeline([a, b], ["cpu", "cpu"], chunks=args.chunks, threads=1, backward=backward)
        return lambda: mse(pipe(x), target).backward()

    def stepped(schedule: str, v: int = 1) -> Callable[[], None]:
        stages = [a, b] if v == 1 else [a[:4], a[4:], b[:4], b[4:]]  # device 0: a[:4], b[:4]
        pipe = Pipeline(
            stages, ["cpu"] * len(stages), chunks=args.chunks, threads=1, schedule=schedule
        )

        def step() -> None:
            pipe.train_step(x, target=target, loss_fn=mse, virtual_stages=v)

        return step

    found: dict[str, Any] = {
        "serial, one thread": ("-", serial),
        "call + backward='autograd'": ("gpipe", piped("autograd")),
        "call + backward='pipelined'": ("gpipe", piped("pipelined")),
    }
    for schedule in ("gpipe", "1f1b", "zero-bubble"):
        found[f"train_step, {schedule}"] = (schedule, stepped(schedule))
    found["train_step, interleaved-1f1b"] = (
        "interleaved-1f1b, V=2",
        stepped("interleaved-1f1b", 2),
    )
    return found


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
    torch.set_num_threads(1)
    runs = ways(args, a, b)
    first = next(iter(runs))
    grads: dict[str, list[torch.Tensor]] = {}
    for name, (_, step) in runs.items():  # warm up, and check all ways agree
        for p in params:
            p.grad = None
        step()
        grads[name] = [p.grad.clone() for p in params if p.grad is not None]
    for got in grads.values():
        for g, want in zip(got, grads[first], strict=True):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
    del grads

    times: dict[str, list[float]] = {name: [] for name in runs}
    pages: dict[str, list[int]] = {name: [] for name in runs}
    peaks: dict[str, list[int]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (_, step) in runs.items():
            for p in params:
                p.grad = None
            f0, t0 = faults(), time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            pages[name].append(faults() - f0)
        for name, (_, step) in runs.items():  # the heap's peak, in steps of their own
            for p in params:
                p.grad = None
            with PeakHeap() as peak:
                step()
            peaks[name].append(peak.above)
    report(args, runs, times, pages, peaks)


def report(
    args: argparse.Namespace,
    runs: dict[str, Any],
    times: dict[str, list[float]],
    pages: dict[str, list[int]],
    peaks: dict[str, list[int]],
) -> None:
    base = times[next(iter(runs))]
    print(
        f"MLP 8x{args.width}, batch {args.batch}, {args.chunks} micro-batches, 2 cpu devices x "
        f"1 thread, torch {torch.__version__}, median of {args.rounds} rounds"
    )
    print(
        f"{'training step':<30} {'schedule':<22} {'ms':>8} {'speed-up':>9} "
        f"{'page faults':>12} {'peak heap MB':>13}"
    )
    for name, (schedule, _) in runs.items():
        ratio = statistics.median(s / t for s, t in zip(base, times[name], strict=True))
        print(
            f"{name:<30} {schedule:<22} {statistics.median(times[name]) * 1e3:>8.1f} "
            f"{ratio:>8.2f}x {statistics.median(pages[name]):>12.0f} "
            f"{statistics.median(peaks[name]) / 2**20:>13.1f}"
        )


if __name__ == "__main__":
    main()
