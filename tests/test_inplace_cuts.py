"""In-place ops across stage boundaries (issue 15.2): every cut, both trace modes.

Every valid assignment of a small graph's compute nodes to 2 or 3 stages (each data edge
going forward, as the planner may choose) must give the model's output, and its gradients
in both backward modes ([Note: in-place ops] in partitioner/capture/inplace.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter
from partitioner.capture.inplace import mutation_hazards
from partitioner.capture.tracer import trace
from partitioner.splitting.compose import run_stages
from partitioner.splitting.cut import split
from runtime import Pipeline
from tests.test_split import COMPUTE, plan_for


class ViewWrite(nn.Module):
    """Writes through a view, then mutates the whole tensor; a view taken before is read after."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        tail = h[:, 4:]
        h[:, :4] += 1
        h.relu_()
        return self.b(h) + tail.sum(1, keepdim=True)


class IdentityAlias(nn.Module):
    """``relu_`` reached through an ``nn.Identity`` (timm's drop path at rate 0), while
    another node read the tensor before."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.main = nn.Linear(8, 8), nn.Linear(8, 8)
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        z = h.mean(-1, keepdim=True)
        return self.main(self.act(self.drop_path(h))) + z


class SideReader(nn.Module):
    """The issue's graph: ``h = a(x); z = side(h); y = main(relu_(identity(h)))``. ``side``
    saves ``h`` for its backward, so eager autograd refuses it: inference only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.side, self.main = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.identity = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        z = self.side(h)
        return self.main(self.act(self.identity(h))) + z


class BasicBlock(nn.Module):
    """A ResNet/HRNet block with an FCN-style head: ReLU(inplace) after BatchNorm and after
    ``out += identity``, an nn.Identity (drop block) in front of the first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.drop_block = nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.drop_block(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        out += x
        return self.head(self.relu(out))


def assignments(gm: torch.fx.GraphModule, k: int) -> Iterator[dict[str, int]]:
    """Every assignment of gm's compute nodes to k non-empty stages with data edges forward."""
    nodes = [n for n in gm.graph.nodes if n.op in COMPUTE]
    index = {n: i for i, n in enumerate(nodes)}

    def extend(stages: list[int]) -> Iterator[list[int]]:
        if len(stages) == len(nodes):
            if len(set(stages)) == k:
                yield stages
            return
        inputs = [stages[index[u]] for u in nodes[len(stages)].all_input_nodes if u in index]
        for j in range(max(inputs, default=0), k):
            yield from extend([*stages, j])

    for stages in extend([]):
        yield {n.name: j for n, j in zip(nodes, stages, strict=True)}


CASES = [
    pytest.param(ViewWrite, (4, 8), "export", True, id="view-write-export"),
    pytest.param(IdentityAlias, (4, 8), "fx", True, id="identity-fx"),
    pytest.param(IdentityAlias, (4, 8), "export", True, id="identity-export"),
    pytest.param(SideReader, (4, 8), "fx", False, id="side-reader-fx"),
    pytest.param(SideReader, (4, 8), "export", False, id="side-reader-export"),
    pytest.param(BasicBlock, (4, 3, 4, 4), "fx", True, id="block-fx"),
    pytest.param(BasicBlock, (4, 3, 4, 4), "export", True, id="block-export"),
]


@pytest.mark.parametrize(("factory", "shape", "mode", "trainable"), CASES)
def test_every_cut_matches_the_model(
    factory: type[nn.Module], shape: tuple[int, ...], mode: str, trainable: bool
) -> None:
    torch.manual_seed(0)
    model = factory().eval()  # eval: BatchNorm uses its running statistics per micro-batch
    x = torch.randn(*shape)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        want = reference(x.clone())
    if trainable:
        reference(x.clone()).pow(2).sum().backward()
    gm = trace(model, (x,), mode=mode)
    assert mutation_hazards(gm) == []  # every change is read through its op
    count = 0
    for k in (2, 3):
        for assignment in assignments(gm, k):
            count += 1
            where = f"{mode}, stages {assignment}"
            stages = split(gm, plan_for(gm, assignment))
            with torch.no_grad():
                torch.testing.assert_close(run_stages(stages, x.clone()), want, msg=where)
            if not trainable:
                continue
            for backward in ("autograd", "pipelined"):
                gm.zero_grad(set_to_none=True)
                pipe = Pipeline(stages, ["cpu"] * k, chunks=2, backward=backward)
                out = pipe(x.clone())
                torch.testing.assert_close(out, want, msg=where)
                out.pow(2).sum().backward()
                for (name, p), r in zip(
                    gm.named_parameters(), reference.parameters(), strict=True
                ):
                    torch.testing.assert_close(p.grad, r.grad, msg=f"{name}, {backward}, {where}")
    assert count > 10


@pytest.mark.parametrize("backward", ["autograd", "pipelined"])
def test_model_splitter_trains_a_model_that_writes_through_a_view(backward: str) -> None:
    torch.manual_seed(0)
    model = ViewWrite()
    reference = copy.deepcopy(model)
    x = torch.randn(12, 8)
    splitter = ModelSplitter(
        model, num_devices=3, chunks=4, backward=backward, trace_mode="export", time_limit=5
    )
    out = splitter(x)
    want = reference(x)
    torch.testing.assert_close(out, want)
    out.pow(2).mean().backward()
    want.pow(2).mean().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
