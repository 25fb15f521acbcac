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
    """One injected failure: ``device`` dies as it starts micro-batch ``microbatch``, in
    ``phase`` "forward" (a task) or "backward" (autograd's backward of a task)."""

    device: str
    microbatch: int
    hang: float | None
    phase: str = "forward"
    fired: bool = False
    active: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)
    pipelines: list[weakref.ref[Any]] = field(default_factory=list)

    def check(self, name: str, i: int, phase: str) -> None:
        # A device that failed in forward raises in forward only: the micro-batches it had
        # completed were kept because a CPU worker's memory survives it ([Note: resuming a
        # call]), and their backward runs as it would have.
        if not self.active or name != self.device or (phase == "backward" != self.phase):
            return
        with self.lock:
            if i == self.microbatch and phase == self.phase:
                self.fired = True
            fired = self.fired
        if not fired:
            return
        if self.hang is not None:
            time.sleep(self.hang)  # a hung device: the pipeline's stage_timeout notices
        raise DeviceFailure(
            name, f"injected failure (from micro-batch {self.microbatch}'s {self.phase})"
        )

    def attach(self, pipe: Any) -> None:
        """Arm this failure on ``pipe`` too: a pipeline its splitter built while the drill
        runs (after a train/eval switch, or for another input structure)."""
        if self.active:
            self.pipelines.append(weakref.ref(pipe))
            _arm(pipe, self)


@dataclass(frozen=True, eq=False)
class _InjectHook:
    """The `Pipeline.on_task` hook of one injector on one pipeline, chained to the hook that
    was there before."""

    injector: _Injector
    names: tuple[str, ...]
    inner: Any = None
    phase: str = "forward"

    def __call__(self, i: int, j: int) -> None:
        self.injector.check(self.names[j], i, self.phase)
        if self.inner is not None:
            self.inner(i, j)

    def rebind(self, pipe: Any) -> _InjectHook:
        """This hook on ``pipe``, a pipeline that replaced the one it was on, so an injected
        device stays dead until no stage runs on it."""
        self.injector.pipelines.append(weakref.ref(pipe))
        inner = rebind_hook(self.inner, pipe)
        return _InjectHook(self.injector, tuple(device_names(pipe)), inner, self.phase)


def _arm(pipe: Any, injector: _Injector) -> None:
    """Chain ``injector`` to ``pipe``'s task hook and (in autograd's backward) its
    backward hook ([Note: a device lost in backward] in `runtime.recovery.watch`)."""
    names = tuple(device_names(pipe))
    pipe.on_task = _InjectHook(injector, names, pipe.on_task)
    pipe.on_backward = _InjectHook(injector, names, pipe.on_backward, "backward")


def _without(hook: Any, injector: _Injector) -> Any:
    if not isinstance(hook, _InjectHook):
        return hook
    inner = _without(hook.inner, injector)
    if hook.injector is injector:
        return inner
    return _InjectHook(hook.injector, hook.names, inner, hook.phase)


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
    target: Any,
    *,
    stage: int,
    microbatch: int,
    hang: float | None = None,
    phase: str = "forward",
) -> Iterator[str]:
    """Within the block, the device running ``stage`` fails as it starts ``microbatch``.

    ``phase="backward"``: it fails as it starts that micro-batch's backward instead (in
    autograd's backward, ``backward="autograd"``): ``loss.backward()`` raises a `StageError`,
    the device is recorded as failed, and the next call re-plans without it
    ([Note: a device lost in backward] in `runtime.recovery.watch`).

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
    if phase not in ("forward", "backward"):
        raise ValueError(f"phase must be 'forward' or 'backward' (got {phase!r})")
    if phase == "backward" and getattr(pipe, "backward", "autograd") != "autograd":
        raise ValueError(
            "phase='backward' drills autograd's backward (backward='autograd'); with "
            "backward='pipelined' a stage's backward is a task: use stage_timeout and hang"
        )
    injector = _Injector(names[stage], microbatch, hang, phase)
    injector.pipelines.append(weakref.ref(pipe))
    _arm(pipe, injector)
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
                held.on_backward = _without(held.on_backward, injector)
