"""Tied weights across devices: one replica per reading device and call, not per micro-batch.

[Note: tied-weight replicas]
A weight read by stages on two devices (GPT-2's token embedding and LM head) lives on the
device of the first stage that reads it. A later stage on another device reads it through
`tied_replica` (`partitioner.splitting.retarget.read_through_copy` puts the call in its
graph). Inside a pipeline worker the replica is made once per call and reused by every
micro-batch of that call (workers live for one call: `runtime.worker.spawn_workers`), so:

- forward: the weight crosses to the reading device once per call, not once per micro-batch;
- backward: every micro-batch's use of the replica meets in one autograd node (the copy), so
  autograd sums their gradients on the reading device and sends the sum back once per call:
  the one Parameter gets the sum of all uses' gradients, as in the unsplit model, and an
  optimizer step updates the only copy there is.

The replica is made afresh on every call because weights may change between calls (an
optimizer step, ``p.data.add_``, ``load_state_dict``) in ways no version counter always
sees; within a call they do not change. Outside a worker (a checkpointed stage recomputing
in backward, a stage called by hand) `tied_replica` copies each time, which is what it did
before and is exact. A weight on the reading device already (CPU workers share the host's
memory) is returned as it is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["replica_scope", "tied_replica"]

_local = threading.local()


class _Replicas:
    """The replicas of one worker's call: {(id(weight), device): replica}, and misses."""

    def __init__(self) -> None:
        self.made: dict[tuple[int, torch.device, bool], torch.Tensor] = {}
        self.copies = 0


@contextmanager
def replica_scope() -> Iterator[_Replicas]:
    """Within the block, this thread reuses each tied weight's replica (one worker's call)."""
    outer = getattr(_local, "replicas", None)
    _local.replicas = scope = _Replicas()
    try:
        yield scope
    finally:
        _local.replicas = outer


def tied_replica(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``weight`` on ``device``: this call's replica inside a worker, else a fresh copy.

    The grad mode is part of the key: a replica made under ``no_grad`` has no autograd
    history and is never handed to a task that records one.
    """
    if weight.device == device:
        return weight
    scope: _Replicas | None = getattr(_local, "replicas", None)
    if scope is None:
        return weight.to(device)
    key = (id(weight), device, torch.is_grad_enabled())
    made = scope.made.get(key)
    if made is None:
        made = scope.made[key] = weight.to(device)
        scope.copies += 1
    return made
