"""Fire drills: make a device fail on purpose, in tests and before production runs."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from runtime.recovery.faults import DeviceFailure, device_names, rebind_hook
from runtime.recovery.resume import latest

__all__ = ["inject_failure"]


@dataclass(eq=False)
class _Injector:
    """One injected failure: ``device`` dies as it starts micro-batch ``microbatch``."""

    device: str
    microbatch: int
    hang: float | None
    fired: bool = False
    active: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)
    pipelines: list[weakref.ref[Any]] = field(default_factory=list)

    def check(self, name: str, i: int) -> None:
        if not self.active or name != self.device:
            return
        with self.lock:
            if i == self.microbatch:
                self.fired = True
            fired = self.fired
        if not fired:
            return
        if self.hang is not None:
            time.sleep(self.hang)  # a hung device: the pipeline's stage_timeout notices
        raise DeviceFailure(name, f"injected failure (from micro-batch {self.microbatch})")

    def attach(self, pipe: Any) -> None:
        """Arm this failure on ``pipe`` too: a pipeline its splitter built while the drill
        runs (after a train/eval switch, or for another input structure)."""
        if self.active:
            self.pipelines.append(weakref.ref(pipe))
            pipe.on_task = _InjectHook(self, tuple(device_names(pipe)), pipe.on_task)


@dataclass(frozen=True, eq=False)
class _InjectHook:
    """The `Pipeline.on_task` hook of one injector on one pipeline, chained to the hook that
    was there before."""

    injector: _Injector
    names: tuple[str, ...]
    inner: Any = None

    def __call__(self, i: int, j: int) -> None:
        self.injector.check(self.names[j], i)
        if self.inner is not None:
            self.inner(i, j)

    def rebind(self, pipe: Any) -> _InjectHook:
        """This hook on ``pipe``, a pipeline that replaced the one it was on, so an injected
        device stays dead until no stage runs on it."""
        self.injector.pipelines.append(weakref.ref(pipe))
        return _InjectHook(self.injector, tuple(device_names(pipe)), rebind_hook(self.inner, pipe))


def _without(hook: Any, injector: _Injector) -> Any:
    if not isinstance(hook, _InjectHook):
        return hook
    inner = _without(hook.inner, injector)
    return inner if hook.injector is injector else _InjectHook(hook.injector, hook.names, inner)


def _pipeline_of(target: Any) -> Any:
    pipe = getattr(target, "pipeline", target)
    if pipe is None or not hasattr(pipe, "on_task"):
        raise ValueError(
            f"{type(target).__name__} has no pipeline yet: plan it first (give "
            f"example_inputs, or call it once)"
        )
    return latest(pipe)


@contextmanager
def inject_failure(
    target: Any, *, stage: int, microbatch: int, hang: float | None = None
) -> Iterator[str]:
    """Within the block, the device running ``stage`` fails as it starts ``microbatch``.

    ``target`` is a ModelSplitter (planned) or a Pipeline. The failure is permanent: from
    then on every task on that device raises `DeviceFailure`, including on the pipelines
    that replace this one, until a re-plan moves every stage off it. Micro-batch indices
    are those of each call (a re-run of 3 lost micro-batches numbers them 0, 1, 2). With
    ``hang``, the device first stalls that many seconds on each task, for testing
    ``stage_timeout``. Yields the failing device's name.
    """
    pipe = _pipeline_of(target)
    names = device_names(pipe)
    if not 0 <= stage < len(names):
        raise ValueError(f"stage must be in 0..{len(names) - 1} (got {stage})")
    if isinstance(microbatch, bool) or microbatch < 0:
        raise ValueError(f"microbatch must be a non-negative integer (got {microbatch!r})")
    injector = _Injector(names[stage], microbatch, hang)
    injector.pipelines.append(weakref.ref(pipe))
    pipe.on_task = _InjectHook(injector, tuple(names), pipe.on_task)
    drills = getattr(target, "drills", None)  # a ModelSplitter arms its next pipelines too
    if isinstance(drills, list):
        drills.append(injector)
    try:
        yield injector.device
    finally:
        if isinstance(drills, list) and injector in drills:
            drills.remove(injector)
        injector.active = False
        for ref in injector.pipelines:
            held = ref()
            if held is not None:
                held.on_task = _without(held.on_task, injector)
