"""Tied weights across devices: one replica per call and reading device ([Note: tied-weight
replicas] in `runtime.replica`)."""

from __future__ import annotations

import torch
from torch import nn

from runtime import Pipeline
from runtime.replica import replica_scope, tied_replica

META = torch.device("meta")


def test_a_scope_reuses_the_replica_and_counts_one_copy() -> None:
    w = torch.randn(4, 4)
    with replica_scope() as scope:
        a, b = tied_replica(w, META), tied_replica(w, META)
        with torch.no_grad():
            c = tied_replica(w, META)  # another grad mode: a replica of its own
    assert a is b and a is not c and a.device == META
    assert scope.copies == 2
    assert tied_replica(w, META) is not tied_replica(w, META)  # no scope: a copy each time
    assert tied_replica(w, torch.device("cpu")) is w  # already there: no copy


class _Reads(nn.Module):
    """A stage that reads ``weight`` as a replica on another device and remembers which."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self.seen: list[torch.Tensor] = []  # the replicas themselves: ids could be reused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tied_replica(self.weight, META))
        return x @ self.weight


def test_every_micro_batch_of_a_call_reads_one_replica_and_each_call_a_new_one() -> None:
    torch.manual_seed(0)
    first = nn.Linear(4, 4)
    reads = _Reads(first.weight)
    pipe = Pipeline([first, reads], ["cpu"] * 2, chunks=4)
    x = torch.randn(8, 4)
    pipe(x).sum().backward()
    once = list(reads.seen)
    pipe(x)
    assert len(once) == 4 and all(r is once[0] for r in once)
    later = reads.seen[4:]
    assert len(later) == 4 and all(r is later[0] for r in later)
    assert later[0] is not once[0]  # the second call made its own
    got = first.weight.grad.clone()  # type: ignore[union-attr]
    first.zero_grad()
    (first(x) @ first.weight).sum().backward()
    torch.testing.assert_close(got, first.weight.grad)
