"""A Chrome / Perfetto timeline of a pipeline run, recorded by forward hooks on the stages.

[Note: timeline]
The runtime is left untouched: a forward pre-hook and a forward hook on each
stage module note the worker thread and ``time.perf_counter()`` around every
call, and the pair becomes one slice on the stage's track. GPipe runs each
stage's micro-batches in order, so the micro-batch index is the stage's call
count since the last `Timeline.step`, unless the runtime names it: pass
`Timeline.note_task` as the pipeline's ``on_task(i, j)`` hook and the index is
the one the schedule gave::

    track          0 ms                                    t
    main           [ iteration 0 ...............................]
    stage 0 cpu:0  [F0][F1][F2][F3]
    stage 1 cpu:1      [F0][F1][F2][F3]
    stage 2 cpu:2          [F0][F1][F2][F3]        <- the bubble is the gaps

The JSON is the Trace Event Format (``ph: "X"`` complete events, times in
microseconds); open it in https://ui.perfetto.dev or chrome://tracing.

On CUDA a stage call returns once its kernels are queued. With ``sync=True``
(the default) the post-hook waits for the stage's stream so a slice covers the
GPU work, at the cost of some overlap between launch and compute.
TODO: copy slices (cross-device transfers on copy streams) need events from the
runtime, which exposes none; they show only as the gap before a stage's slice.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Slice", "Timeline"]


@dataclass(frozen=True)
class Slice:
    """One stage call: micro-batch ``i`` on stage ``j`` (times in seconds, perf_counter)."""

    i: int
    j: int
    start: float
    end: float
    thread: str
    step: int

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    """Records a slice per (micro-batch, stage) while attached to a pipeline's stages.

    >>> timeline = Timeline(stages, ["cpu:0", "cpu:1"])      # doctest: +SKIP
    >>> with timeline.recording():                             # doctest: +SKIP
    ...     with timeline.iteration():
    ...         pipeline(x)
    >>> timeline.save("timeline.json")                         # doctest: +SKIP
    """

    stages: Sequence[nn.Module]
    devices: Sequence[str] = ()
    sync: bool = True
    slices: list[Slice] = field(default_factory=list)
    iterations: list[tuple[float, float]] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list, repr=False)
    _open: dict[tuple[int, int], float] = field(default_factory=dict, repr=False)
    _calls: list[int] = field(default_factory=list, repr=False)
    _noted: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _origin: float = field(default_factory=time.perf_counter, repr=False)

    def __post_init__(self) -> None:
        if self.devices and len(self.devices) != len(self.stages):
            raise ValueError(
                f"timeline got {len(self.devices)} devices for {len(self.stages)} stages"
            )
        self._calls = [0] * len(self.stages)

    # -- recording ------------------------------------------------------------
    def attach(self) -> None:
        """Install the hooks (idempotent)."""
        if self._handles:
            return
        for j, stage in enumerate(self.stages):
            self._handles.append(stage.register_forward_pre_hook(self._pre_hook(j)))
            self._handles.append(stage.register_forward_hook(self._post_hook(j)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def recording(self) -> Iterator[Timeline]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def step(self) -> None:
        """Start a new iteration: micro-batch indices count from 0 again."""
        with self._lock:
            self._calls = [0] * len(self.stages)

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        """Mark one pipeline call as an iteration slice on the main track."""
        self.step()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.iterations.append((start, time.perf_counter()))

    def note_task(self, i: int, j: int) -> None:
        """A pipeline ``on_task(i, j)`` hook: stage j's worker is about to run micro-batch i."""
        with self._lock:
            self._noted[(j, threading.get_ident())] = i

    def _pre_hook(self, j: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            with self._lock:
                self._open[(j, threading.get_ident())] = time.perf_counter()

        return hook

    def _post_hook(self, j: int) -> Any:
        device = torch.device(self.devices[j]) if self.devices else None

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.sync and device is not None and device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            end = time.perf_counter()
            with self._lock:
                start = self._open.pop((j, threading.get_ident()), None)
                if start is None:
                    return
                i = self._noted.pop((j, threading.get_ident()), self._calls[j])
                self._calls[j] += 1
                name = threading.current_thread().name
                self.slices.append(Slice(i, j, start, end, name, len(self.iterations)))

        return hook

    # -- reading --------------------------------------------------------------
    def busy(self) -> list[float]:
        """Fraction of the recorded iterations' wall time each stage spent computing."""
        wall = sum(end - start for start, end in self.iterations)
        if wall <= 0:
            return [0.0] * len(self.stages)
        totals = [0.0] * len(self.stages)
        for s in self.slices:
            totals[s.j] += s.duration
        return [t / wall for t in totals]

    def to_chrome(self) -> dict[str, Any]:
        """The Trace Event Format object: a track per stage and one for the main thread."""
        pid = os.getpid()

        def us(t: float) -> float:
            return round((t - self._origin) * 1e6, 3)

        def meta(tid: int | None, name: str, args: dict[str, Any]) -> dict[str, Any]:
            event = {"ph": "M", "pid": pid, "name": name, "args": args}
            return event if tid is None else {**event, "tid": tid}

        def span(tid: int, name: str, cat: str, start: float, seconds: float) -> dict[str, Any]:
            return {
                "ph": "X",
                "pid": pid,
                "tid": tid,
                "name": name,
                "cat": cat,
                "ts": us(start),
                "dur": round(seconds * 1e6, 3),
            }

        events = [meta(None, "process_name", {"name": "modelsplit"})]
        events.append(meta(0, "thread_name", {"name": "main"}))
        for j in range(len(self.stages)):
            where = f" {self.devices[j]}" if self.devices else ""
            events.append(meta(j + 1, "thread_name", {"name": f"stage {j}{where}"}))
            events.append(meta(j + 1, "thread_sort_index", {"sort_index": j + 1}))
        for k, (start, end) in enumerate(self.iterations):
            events.append(span(0, f"iteration {k}", "iteration", start, end - start))
        for s in self.slices:
            event = span(s.j + 1, f"F{s.i}", "forward", s.start, s.duration)
            event["args"] = {
                "micro_batch": s.i,
                "stage": s.j,
                "iteration": s.step,
                "thread": s.thread,
            }
            events.append(event)
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_chrome(), f)
            f.write("\n")
