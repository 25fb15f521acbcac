"""Activation checkpointing of stage tasks (torch.utils.checkpoint, non-reentrant).

A checkpointed task keeps only its inputs in the forward pass and recomputes the stage's
activations when backward reaches it. Like torchgpipe, a mode picks the micro-batches:

- ``"never"``: none;
- ``"except_last"``: all but the last micro-batch, whose backward comes first, right after
  its forward, so recomputing it would buy nothing;
- ``"always"``: all of them.

A list gives one mode per stage. Nothing is checkpointed when grad is disabled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch.utils.checkpoint

__all__ = ["MODES", "Checkpoint", "checkpoint_stops", "checkpointed"]

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
