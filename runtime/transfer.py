"""Move the tensors of a value to the stage (or caller) that reads it, stream-safely."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from runtime.copy import copy, wait
from runtime.microbatch import tree_leaves, tree_map
from runtime.route import CALLER
from runtime.stream import AbstractStream, Event, current_stream, is_cuda, new_stream

__all__ = ["Transfer"]


class Transfer:
    """Apply [Note: copy and wait] to every tensor of a value, per source device.

    Each stage has a compute stream, an out-copy stream (on its device, for what it sends)
    and an in-copy stream (for what it receives), made once. Values of a CPU-only pipeline
    need nothing and pass through untouched (`to_cpu` moves the caller's inputs once).
    """

    def __init__(self, devices: Sequence[torch.device], streams: Sequence[AbstractStream]):
        self.devices = list(devices)
        self.streams = list(streams)
        self.copy_out = [new_stream(d) for d in devices]
        self.copy_in = [new_stream(d) for d in devices]
        self.cpu_only = all(d.type == "cpu" for d in devices)

    def to_stage(
        self, value: Any, producer: int, i: int, j: int, events: Sequence[Sequence[Event]]
    ) -> Any:
        """``value`` (made by ``producer``, micro-batch i) as stage j reads it."""
        if self.cpu_only:
            return value
        return _map_tensors(value, lambda ts, src: self._move(ts, src, producer, i, j, events))

    def to_cpu(self, tree: Any) -> Any:
        """The caller's inputs of a CPU-only pipeline, with any tensor elsewhere moved over."""
        if not any(
            isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree_leaves(tree)
        ):
            return tree
        return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, tree)

    def to_caller(
        self, value: Any, producer: int, i: int, events: Sequence[Sequence[Event]]
    ) -> Any:
        """``value`` ready for the caller's current streams (it stays on its device)."""
        if self.cpu_only:
            return value

        def settle(tensors: tuple[torch.Tensor, ...], src: torch.device) -> tuple[Any, ...]:
            stream, event = self._source(src, producer, i, events)
            caller = current_stream(src)
            if not is_cuda(stream) or stream == caller:
                return tensors
            return wait(tensors, stream, caller, event)

        return _map_tensors(value, settle)

    def _source(
        self, src: torch.device, producer: int, i: int, events: Sequence[Sequence[Event]]
    ) -> tuple[AbstractStream, Event]:
        """The stream that wrote a tensor on ``src``, and the event marking it written."""
        if producer != CALLER and self.devices[producer] == src:
            return self.streams[producer], events[i][producer]
        return current_stream(src), None

    def _move(
        self,
        tensors: tuple[torch.Tensor, ...],
        src: torch.device,
        producer: int,
        i: int,
        j: int,
        events: Sequence[Sequence[Event]],
    ) -> tuple[Any, ...]:
        dst, compute = self.devices[j], self.streams[j]
        stream, event = self._source(src, producer, i, events)
        if src == dst:
            # Same device: the compute stream waits for the producer's event [4].
            return wait(tensors, stream, compute, event) if is_cuda(compute) else tensors
        if producer != CALLER and self.devices[producer] == src:
            out = self.copy_out[producer]
        else:
            out = current_stream(src)
        moved = wait(tensors, stream, out, event)  # [2]
        moved = copy(moved, out, self.copy_in[j])  # [3]
        return wait(moved, self.copy_in[j], compute)  # [4]


def _map_tensors(value: Any, move: Any) -> Any:
    """Rebuild ``value`` with its tensors replaced by ``move(tensors, device)``, per device."""
    if isinstance(value, torch.Tensor):
        return move((value,), value.device)[0]
    leaves, spec = pytree.tree_flatten(value)
    groups: dict[torch.device, list[int]] = {}
    for k, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            groups.setdefault(leaf.device, []).append(k)
    if not groups:
        return value
    for device, ks in groups.items():
        for k, moved in zip(ks, move(tuple(leaves[k] for k in ks), device), strict=True):
            leaves[k] = moved
    return pytree.tree_unflatten(leaves, spec)
