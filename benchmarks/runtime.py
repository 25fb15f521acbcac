"""Runtime benchmark: a 2-stage CPU pipeline against the same micro-batches on one thread.

    .venv/bin/python benchmarks/runtime.py            # ~10 s on 2 idle cores

An 8-layer, 1024-wide MLP (batch 512, 8 micro-batches) is split 4 + 4 layers over two
"cpu" stages; each stage's worker gets max(1, cores // 2) intra-op threads, and the fill and
drain tasks, which run alone, borrow the idle stage's cores ([Note: borrowed cores]). The baseline
runs the same 8 micro-batches one after another on one thread (`torch.set_num_threads(1)`).
Rounds alternate baseline and pipeline so both see the same machine load; the reported
speed-up is the median over rounds of (baseline time / pipeline time) of the same round.
With fixed threads GPipe's fill and drain would bound it by 2m / (m + 1) = 1.78x for m = 8 on
two stages; borrowing the idle core during the fill and drain lifts that bound. Run it on
an idle machine: two stages need two free cores. The unsplit model on all cores is printed
for honesty, and the per-hop overhead is timed with trivial (identity) stages. The
free-running row runs the two halves on two threads with no dependency between them: what
the two cores give at all (shared caches and memory bandwidth slow concurrent GEMMs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import Pipeline  # noqa: E402


def mlp(width: int, layers: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*blocks)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_after_another(model: nn.Module, x: torch.Tensor, chunks: int) -> torch.Tensor:
    """The same micro-batches, one after another, on the calling thread."""
    return torch.cat([model(mb) for mb in torch.tensor_split(x, chunks)])


def free_running(halves: list[nn.Module], x: torch.Tensor, chunks: int) -> None:
    """Each half on its own thread over all micro-batches, with no dependency between them:
    what two cores give on this machine without any pipeline (the hardware ceiling)."""

    def loop(half: nn.Module) -> None:
        torch.set_num_threads(1)
        with torch.no_grad():
            for mb in torch.tensor_split(x, chunks):
                half(mb)

    threads = [threading.Thread(target=loop, args=(half,)) for half in halves]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def hop_overhead(n: int, m: int, rounds: int) -> float:
    """Seconds per micro-batch per stage hop with identity stages (best of ``rounds``)."""
    pipe = Pipeline([nn.Identity() for _ in range(n)], ["cpu"] * n, chunks=m)
    x = torch.randn(m, 4)
    pipe(x)
    return min(timed(lambda: pipe(x)) for _ in range(rounds)) / (m * n)


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    load_before = _load()
    torch.manual_seed(0)
    model = mlp(args.width, args.layers).eval()
    half = len(model) // 2
    pipe = Pipeline([model[:half], model[half:]], ["cpu", "cpu"], chunks=args.chunks)
    x = torch.randn(args.batch, args.width)
    saved = torch.get_num_threads()

    serial: list[float] = []
    piped: list[float] = []
    unsplit: list[float] = []
    free: list[float] = []
    with torch.no_grad():
        torch.set_num_threads(1)
        torch.testing.assert_close(pipe(x), one_after_another(model, x, args.chunks))
        for _ in range(args.rounds):
            torch.set_num_threads(1)
            serial.append(timed(lambda: one_after_another(model, x, args.chunks)))
            piped.append(timed(lambda: pipe(x)))
            free.append(timed(lambda: free_running([model[:half], model[half:]], x, args.chunks)))
            torch.set_num_threads(cores)
            unsplit.append(timed(lambda: model(x)))
    torch.set_num_threads(saved)

    t_serial, t_pipe, t_all = (statistics.median(t) for t in (serial, piped, unsplit))
    speedup = statistics.median(s / p for s, p in zip(serial, piped, strict=True))
    speedup_all = statistics.median(s / a for s, a in zip(serial, unsplit, strict=True))
    t_free = statistics.median(free)
    speedup_free = statistics.median(s / f for s, f in zip(serial, free, strict=True))
    hop2 = hop_overhead(2, 64, args.rounds)
    hop4 = hop_overhead(4, 64, args.rounds)
    bound = 2 * args.chunks / (args.chunks + 1)
    rows = [
        ("one thread, micro-batches one after another", t_serial, 1.0),
        (f"pipeline, 2 cpu stages x {max(1, cores // 2)} thread(s), borrowing", t_pipe, speedup),
        ("2 threads, halves free-running (no pipeline deps)", t_free, speedup_free),
        (f"unsplit model, {cores} threads, whole batch", t_all, speedup_all),
    ]
    print(
        f"MLP {args.layers}x{args.width}, batch {args.batch}, {args.chunks} micro-batches, "
        f"{cores} cores, torch {torch.__version__}, median of {args.rounds} rounds "
        f"(load average before: {load_before})"
    )
    print(f"{'run':<50} {'ms':>8} {'speed-up':>9}")
    for name, seconds, ratio in rows:
        print(f"{name:<50} {seconds * 1e3:>8.1f} {ratio:>8.2f}x")
    best = max(s / p for s, p in zip(serial, piped, strict=True))
    # What share of the two cores' own ceiling the pipeline reaches, round by round.
    efficiency = statistics.median(f / p for f, p in zip(free, piped, strict=True))
    print(
        f"pipeline speed-up {speedup:.2f}x, best round {best:.2f}x "
        f"(fixed-thread GPipe bound {bound:.2f}x, target 1.60x); load average {_load()}"
    )
    print(
        f"pipeline reaches {100 * efficiency:.0f}% of the free-running ceiling "
        f"(free-running time / pipeline time, median of rounds)"
    )
    print(f"per-hop overhead, identity stages, 64 micro-batches: {hop2 * 1e6:.1f} us (2 stages),")
    print(f"                                                     {hop4 * 1e6:.1f} us (4 stages)")


if __name__ == "__main__":
    main()
