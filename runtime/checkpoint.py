"""Activation checkpointing of stage tasks (torch.utils.checkpoint, non-reentrant).

A checkpointed task keeps only its inputs in the forward pass and recomputes the stage's
activations when backward reaches it. Like torchgpipe, a mode picks the micro-batches:

- ``"never"``: none;
- ``"except_last"``: all but the last micro-batch, whose backward comes first, right after
  its forward, so recomputing it would buy nothing;
- ``"always"``: all of them.

A list gives one mode per stage. Nothing is checkpointed when grad is disabled.

[Note: random ops and recomputation]
A checkpointed task saves the RNG state when it starts and restores it when backward
recomputes it, so dropout draws the same mask twice. That holds only if nobody else draws
from the same generator meanwhile. The CPU has one default generator for the process (a
CUDA device, one per device), and two stages on it run at once in the pipeline: their
draws interleave, the recomputation draws other numbers than the forward did, and the
gradients come out silently wrong. So when a generator is shared by two or more stages
that draw random numbers and one of them is checkpointed, those stages' tasks (and, with
the pipelined backward, their backward tasks, which recompute) take one lock per
generator: they run one at a time, each with the generator to itself. Other stages keep
running in parallel. Random draws are found by op name in GraphModule stages (dropout,
bernoulli, rand*, normal_, ...) and by module type elsewhere (dropout layers in training
mode, RReLU); a plain module that calls ``torch.rand`` in its own forward is not seen.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.fx
import torch.utils.checkpoint
from torch import nn

__all__ = ["MODES", "Checkpoint", "checkpoint_stops", "checkpointed", "draws_random", "rng_locks"]

Mode = Literal["never", "except_last", "always"]
Checkpoint = str | Sequence[str]
MODES: tuple[str, ...] = ("never", "except_last", "always")


def _check(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"checkpoint must be one of {', '.join(map(repr, MODES))} ({mode!r})")
    return mode


def checkpoint_stops(checkpoint: Checkpoint, n: int) -> Callable[[int], list[int]]:
    """Validate ``checkpoint`` for n stages; return m -> per-stage stop (i < stop: checkpoint)."""
    if isinstance(checkpoint, str):
        modes = [_check(checkpoint)] * n
    else:
        modes = [_check(mode) for mode in checkpoint]
        if len(modes) != n:
            raise ValueError(
                f"checkpoint must give one mode per stage ({len(modes)} != {n} stages)"
            )

    def stops(m: int) -> list[int]:
        return [{"never": 0, "except_last": m - 1, "always": m}[mode] for mode in modes]

    return stops


def checkpointed(function: Callable[..., Any], *values: Any) -> Any:
    """``function(*values)``, keeping no activations but the inputs until backward."""
    return torch.utils.checkpoint.checkpoint(function, *values, use_reentrant=False)


# Op names (aten overloads and torch functions alike) that draw from a generator.
_RANDOM_WORDS = (
    "dropout",
    "bernoulli",
    "rand",  # rand, randn, randint, randperm, rand_like, ...
    "normal",
    "uniform",
    "multinomial",
    "exponential",
    "cauchy",
    "geometric",
    "log_normal",
    "random_",
    "rrelu",
)
_RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)


def _is_random_name(name: str) -> bool:
    name = name.lower().replace("normalize", "")  # F.normalize draws nothing
    return any(word in name for word in _RANDOM_WORDS)


# GraphModule -> whether its graph draws random numbers; graphs do not change once split.
_GRAPH_RANDOM: weakref.WeakKeyDictionary[torch.fx.GraphModule, bool] = weakref.WeakKeyDictionary()


def _graph_draws_random(gm: torch.fx.GraphModule) -> bool:
    found = _GRAPH_RANDOM.get(gm)
    if found is None:
        found = _GRAPH_RANDOM[gm] = _scan(gm)
    return found


def _scan(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op == "call_function":
            target = node.target
            name = getattr(target, "__name__", None) or str(target)
            if _is_random_name(name):
                return True
        elif node.op == "call_method" and _is_random_name(str(node.target)):
            return True
    return False


def draws_random(stage: nn.Module) -> bool:
    """Whether running ``stage`` may draw random numbers ([Note: random ops and
    recomputation]): dropout-like modules in training mode, or random ops in a GraphModule."""
    for module in stage.modules():
        if isinstance(module, _RANDOM_MODULES):
            if module.training and getattr(module, "p", 1.0) > 0:
                return True
        elif isinstance(module, torch.fx.GraphModule) and _graph_draws_random(module):
            return True
    return False


def _generator(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"


def rng_locks(
    stages: Sequence[nn.Module], devices: Sequence[torch.device], stops: Sequence[int]
) -> list[threading.Lock | None]:
    """One lock per generator that two random stages share while one is checkpointed
    (``stops[j] > 0``); None for the stages that need none. See the Note above."""
    if not any(stops):
        return [None] * len(stages)
    random = [draws_random(stage) for stage in stages]
    groups: dict[str, list[int]] = {}
    for j, device in enumerate(devices):
        if random[j]:
            groups.setdefault(_generator(device), []).append(j)
    locks: list[threading.Lock | None] = [None] * len(stages)
    for members in groups.values():
        if len(members) >= 2 and any(stops[j] > 0 for j in members):
            lock = threading.Lock()
            for j in members:
                locks[j] = lock
    return locks
