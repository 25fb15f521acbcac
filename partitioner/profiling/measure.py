"""Per-node measurements of an fx graph: seconds, FLOPs, output and saved bytes.

`measure` runs the graph node by node (an fx `Interpreter`). The first pass
counts, per node, FLOPs (`torch.utils.flop_counter`), the bytes of its output
and, when ``training``, the bytes autograd saves for backward while the node
runs (through `saved_tensors_hooks`). With ``timed`` it then runs ``repeat``
timed passes (the first pass was their warm-up) and keeps each node's fastest run.

[Note: timing on a busy machine]
Noise on a shared CPU only ever adds time: another process takes the core, an idle OpenMP
thread wakes late. So a node's fastest run is its cost, and the median is not (one busy
machine measured a LayerNorm at 14 ms in one run and 15 µs in the next, and the plan moved
with it). Where a node's median still exceeds twice its fastest run by a share of the pass
that matters, a second set of passes runs; nodes that still disagree are named in a warning.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ESTIMATE",
    "Measurements",
    "Progress",
    "disagreeing",
    "measure",
    "nbytes",
    "tensor_key",
    "tree_nbytes",
    "us",
]

logger = logging.getLogger(__name__)

PROGRESS_AFTER_S = 1.0
#: a node's seconds from its timed runs: the fastest ([Note: timing on a busy machine]);
#: `benchmarks/plan_stability.py` sets the median beside it
ESTIMATE: Callable[[list[float]], float] = min


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements (a view counts its own elements, not its storage)."""
    return int(t.numel() * t.element_size())


def tree_nbytes(value: Any) -> int:
    """Bytes of every tensor leaf of a (possibly nested) value; non-tensors are 0."""
    return sum(nbytes(t) for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


@dataclass
class Measurements:
    """What `measure` found, keyed by node name."""

    out_bytes: dict[str, int] = field(default_factory=dict)
    in_bytes: dict[str, int] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    saved_bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def tensor_key(t: torch.Tensor) -> int:
    """Identity of a tensor's memory: its storage pointer, or the object on `meta`."""
    if t.device.type != "meta":
        ptr = t.untyped_storage().data_ptr()
        if ptr:
            return int(ptr)
    return id(t)


class _Probe(fx.Interpreter):
    """An Interpreter that reports every node to ``on_node`` with its output and seconds."""

    def __init__(
        self,
        gm: fx.GraphModule,
        on_node: Callable[[fx.Node, Any, tuple[Any, ...], dict[str, Any], float], None],
        sync: Callable[[], None],
    ) -> None:
        super().__init__(gm)
        self.on_node = on_node
        self.sync = sync
        self.current = ""

    def run_node(self, n: fx.Node) -> Any:
        self.current = n.name
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.sync()
            start = time.perf_counter()
            out = getattr(self, n.op)(n.target, args, kwargs)
            self.sync()
            self.on_node(n, out, args, kwargs, time.perf_counter() - start)
            return out


class Progress:
    """A rich progress bar that appears only on a TTY once work has taken over a second."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what = total, what
        self.start = time.perf_counter()
        self.done = 0
        self.bar: Any = None
        self.task: Any = None
        self.tty = sys.stderr.isatty()

    def advance(self) -> None:
        self.done += 1
        if self.bar is None:
            if not self.tty or time.perf_counter() - self.start < PROGRESS_AFTER_S:
                return
            from rich.console import Console
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=self.total, completed=self.done)
        self.bar.update(self.task, completed=self.done, total=self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextmanager
def _saving(record: Callable[[torch.Tensor], None], enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return

    def pack(t: torch.Tensor) -> torch.Tensor:
        record(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def measure(
    gm: fx.GraphModule,
    inputs: Sequence[Any],
    *,
    timed: bool,
    repeat: int,
    training: bool,
    exclude: set[int],
    sync: Callable[[], None] = lambda: None,
) -> Measurements:
    """Measure every node of ``gm`` on the positional placeholder values ``inputs``.

    ``exclude`` holds `tensor_key`s (parameters, buffers) that do not count as
    saved activations. Saved tensors are counted once, at the first node saving them.
    """
    found = Measurements()
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    progress = Progress(len(nodes) * (1 + (repeat if timed else 0)), "profiling")
    counter = FlopCounterMode(display=False)
    seen: set[int] = set(exclude)
    keep: list[torch.Tensor] = []  # keeps ids stable while `seen` uses them on meta

    def record(t: torch.Tensor) -> None:
        key = tensor_key(t)
        if key not in seen:
            seen.add(key)
            keep.append(t)
            name = probe.current
            found.saved_bytes[name] = found.saved_bytes.get(name, 0) + nbytes(t)

    counted = [0]  # FLOPs counted before the current node

    def first(n: fx.Node, out: Any, args: Any, kwargs: Any, _: float) -> None:
        total = counter.get_total_flops()
        found.flops[n.name], counted[0] = total - counted[0], total
        found.out_bytes[n.name] = tree_nbytes(out)
        found.in_bytes[n.name] = tree_nbytes((args, kwargs))
        progress.advance()

    probe = _Probe(gm, first, sync)
    try:
        grad = torch.enable_grad() if training else torch.no_grad()
        with grad, counter, _saving(record, training):
            probe.run(*inputs, enable_io_processing=False)
        keep.clear()
        if timed:
            found.seconds = _time(gm, inputs, repeat, training, sync, progress)
    finally:
        progress.close()
    return found


def _time(
    gm: fx.GraphModule,
    inputs: Sequence[Any],
    repeat: int,
    training: bool,
    sync: Callable[[], None],
    progress: Progress,
) -> dict[str, float]:
    samples: dict[str, list[float]] = {}

    def timed(n: fx.Node, out: Any, args: Any, kwargs: Any, seconds: float) -> None:
        samples.setdefault(n.name, []).append(seconds)
        progress.advance()

    grad = torch.enable_grad if training else torch.no_grad

    def passes(count: int) -> None:
        for _ in range(count):  # the counting pass before has warmed up
            with grad():
                _Probe(gm, timed, sync).run(*inputs, enable_io_processing=False)

    passes(repeat)
    if disagreeing(samples):  # [Note: timing on a busy machine]
        progress.total += repeat * len(samples)
        passes(repeat)
        noisy = disagreeing(samples)
        if noisy:
            logger.warning(
                "profile: timing is noisy here (another process on these cores?): %d node(s) "
                "still disagree after a second set of passes, e.g. %s; the plan uses each "
                "node's fastest run (cost='flops' plans without timing)",
                len(noisy),
                ", ".join(
                    f"{n} (fastest {us(min(samples[n]))}, median "
                    f"{us(statistics.median(samples[n]))})"
                    for n in noisy[:3]
                ),
            )
    return {name: ESTIMATE(s) for name, s in samples.items()}


#: a node's timing disagrees when its median is over this many times its fastest run...
SPREAD = 2.0
#: ...and the difference is over this share of a whole pass (and over 20 µs)
SHARE = 0.01


def disagreeing(samples: dict[str, list[float]]) -> list[str]:
    """Nodes whose runs disagree enough to move a plan, the worst first."""
    total = sum(min(s) for s in samples.values())
    excess = {n: statistics.median(s) - min(s) for n, s in samples.items()}
    bad = [
        n
        for n, s in samples.items()
        if statistics.median(s) > SPREAD * min(s) and excess[n] > max(20e-6, SHARE * total)
    ]
    return sorted(bad, key=lambda n: -excess[n])


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.3g} ms"
