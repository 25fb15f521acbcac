"""torch.distributed.pipelining runs of split plans: relay, CLI, training, failures.

The multi-process tests launch ``torch.distributed.run`` on 127.0.0.1 only
(static rendezvous on a free port, gloo over loopback), each bounded by a
subprocess timeout, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import networkx as nx
import pytest
import torch
from torch import nn

from partitioner.capture.tracer import trace
from partitioner.errors import ModelSplitError
from partitioner.planner.plan import Plan, make_plan
from partitioner.splitting.cut import split
from runtime.distributed.relay import boundaries, relay
from runtime.interface import stage_io

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
LAUNCH_TIMEOUT = 120


class SkipNet(nn.Module):
    """x -> a -> b -> c; out = head(c + 2a): ``2a`` skips the middle stage, and the batch
    size (a Python int from ``x.size(0)``) is made on stage 0 and read on stage 2."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc0, self.fc1, self.fc2, self.head = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        a = torch.relu(self.fc0(x))
        skip = a * 2.0
        b = torch.tanh(self.fc1(a))
        c = self.fc2(b).reshape(n, -1)
        return self.head(c + skip)


def skip_net() -> SkipNet:
    """Factory for the CLI (``tests/test_distributed.py:skip_net``)."""
    return SkipNet()


def failing_net() -> SkipNet:
    """Fails on rank 1 only, after rank 0 has gone on to wait for it."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("factory failed on purpose on rank 1")
    return SkipNet()


def hand_plan(gm: torch.fx.GraphModule, stage_of: Callable[[torch.fx.Node], int], n: int) -> Plan:
    """A plan with a hand-made assignment (unit costs): tests pick where the cut is."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        graph.add_node(
            node.name, time=1.0, param_bytes=0, out_bytes=4, act_bytes=0, flops=0, order=0
        )
        graph.add_edges_from((u.name, node.name) for u in node.all_input_nodes)
    assignment = {v: stage_of(node) for node in gm.graph.nodes if (v := node.name) in graph}
    return make_plan(graph, assignment, n, lower_bound=0.0, status="baseline", solver="hand")


def skip_stage(node: torch.fx.Node) -> int:
    """SkipNet on 3 stages: fc0 and the size on 0, fc1 on 1, the rest on 2."""
    text = f"{node.name} {node.target}"
    if node.op == "placeholder" or "fc0" in text or "size" in text or "relu" in text:
        return 0
    if node.name == "mul":
        return 0
    return 1 if "fc1" in text or "tanh" in text else 2


def _skip_split() -> tuple[SkipNet, torch.Tensor, list[torch.fx.GraphModule]]:
    torch.manual_seed(0)
    model = SkipNet().eval()
    x = torch.randn(8, 16)
    gm = trace(model, (x,), mode="fx")
    return model, x, split(gm, hand_plan(gm, skip_stage, 3))


# -- relay, in process ------------------------------------------------------------


def test_boundaries_relay_skip_values_through_the_middle_stage() -> None:
    _, _, stages = _skip_split()
    ios = [stage_io(s) for s in stages]
    bounds = boundaries(ios)
    skip = [v for v in ios[2].inputs if v in ios[0].outputs]
    assert skip, "the plan should make stage 2 read a value of stage 0"
    for name in skip:
        assert name in bounds[1] and name in bounds[2] and name not in ios[1].inputs
    assert bounds[0] == ios[0].program.inputs
    assert len(bounds) == 4


def test_relay_stages_in_sequence_equal_the_model_and_carry_ints_as_tensors() -> None:
    model, x, stages = _skip_split()
    wrapped, bounds, examples = relay(stages, {"x": x[:2]})
    assert "int" in {examples.kinds[v] for b in bounds[1:-1] for v in b}
    values: tuple[object, ...] = (x,)
    for j, stage in enumerate(wrapped):
        values = stage(*values)
        if j < len(wrapped) - 1:
            assert all(isinstance(v, torch.Tensor) for v in values)
    torch.testing.assert_close(values[0], model(x))


class ShapeAcross(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.fc(x).view(shape[0], -1)


def test_a_non_tensor_value_crossing_stages_is_a_clear_error() -> None:
    model = ShapeAcross()
    x = torch.randn(4, 4)
    gm = trace(model, (x,), mode="fx")

    def stage_of(node: torch.fx.Node) -> int:
        return 0 if node.op == "placeholder" or node.name.startswith("getattr") else 1

    stages = split(gm, hand_plan(gm, stage_of, 2))
    with pytest.raises(ModelSplitError, match="sends tensors only"):
        relay(stages, {"x": x[:2]})


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A one-process gloo group on 127.0.0.1, torn down after the test."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_world_size_must_equal_the_number_of_stages(one_rank: None) -> None:
    from runtime.distributed import DistributedPipeline

    _, x, stages = _skip_split()
    with pytest.raises(ModelSplitError, match="3 stages but 1 processes"):
        DistributedPipeline(stages, ((x,), {}), chunks=4)


@needs_gloo
def test_one_rank_pipeline_runs_forward_and_rejects_uneven_micro_batches(one_rank: None) -> None:
    from runtime.distributed import DistributedPipeline

    torch.manual_seed(0)
    model = SkipNet().eval()
    x = torch.randn(8, 16)
    gm = trace(model, (x,), mode="fx")
    stages = split(gm, hand_plan(gm, lambda n: 0, 1))
    pipe = DistributedPipeline(stages, ((x,), {}), chunks=4)
    torch.testing.assert_close(pipe(x), model(x))
    with pytest.raises(ModelSplitError, match="built for"):
        pipe(x[:4])
    with pytest.raises(ModelSplitError, match="not a multiple of chunks=3"):
        DistributedPipeline(stages, ((x,), {}), chunks=3)


def test_check_prints_the_error_and_fails_beyond_the_tolerance(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from types import SimpleNamespace

    from runtime.distributed.launch import _check_forward, build_parser

    args = build_parser().parse_args(["m.py:f", "--input-shape", "4,4", "--chunks", "2"])
    ref = SimpleNamespace(output=torch.ones(4, 4))
    last = SimpleNamespace(is_last=True)
    assert _check_forward(args, last, ref, torch.ones(4, 4) + 1e-7)  # type: ignore[arg-type]
    assert not _check_forward(args, last, ref, torch.ones(4, 4) + 0.1)  # type: ignore[arg-type]
    assert "max abs err 0.1" in capsys.readouterr().out


# -- torchrun launches --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, *argv: str, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """``torch.distributed.run`` with ``nproc`` ranks on 127.0.0.1, bounded by ``timeout``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        "-m",
        "runtime.distributed",
        *argv,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _errs(out: str) -> list[float]:
    return [float(line.split()[3]) for line in out.splitlines() if line.startswith("max abs err")]


@pytest.mark.slow
@needs_gloo
def test_three_ranks_skip_connection_forward_and_training_gradients(tmp_path: Path) -> None:
    model, x, _ = _skip_split()
    gm = trace(model, (x,), mode="fx")
    plan_path = tmp_path / "plan.json"
    hand_plan(gm, skip_stage, 3).save(plan_path)
    res = launch(
        3,
        f"{HERE}:skip_net",
        "--plan",
        str(plan_path),
        "--input-shape",
        "8,16",
        "--chunks",
        "4",
        "--schedule",
        "1f1b",
        "--iters",
        "2",
        "--train",
        "--check",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    errs = _errs(res.stdout)
    assert len(errs) == 2 and max(errs) < 1e-5, res.stdout  # output, then gradients
    assert "samples/s" in res.stdout


def gpt_tiny() -> nn.Module:
    from partitioner.examples import gpt

    return gpt(vocab=64, dim=32, layers=2, heads=2, max_len=16)


@pytest.mark.slow
@needs_gloo
def test_two_ranks_gpipe_tied_weights_train_like_the_unsplit_model(tmp_path: Path) -> None:
    """GPT's LM head is tied to the token embedding: the two ranks hold one copy each and
    their gradients are summed, so each equals the unsplit model's."""
    model = gpt_tiny().eval()
    ids = torch.randint(0, 64, (4, 8))
    gm = trace(model, (ids,))
    order = [n.name for n in gm.graph.nodes]
    cut = order.index("blocks_1_ln1")  # stage 0: embeddings and block 0; stage 1: the rest
    plan = hand_plan(gm, lambda node: 0 if order.index(node.name) < cut else 1, 2)
    plan.save(tmp_path / "plan.json")
    res = launch(
        2,
        f"{HERE}:gpt_tiny",
        "--plan",
        str(tmp_path / "plan.json"),
        "--input-shape",
        "4,8",
        "--dtype",
        "int64:64",
        "--chunks",
        "2",
        "--iters",
        "1",
        "--train",
        "--check",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    errs = _errs(res.stdout)
    assert len(errs) == 2 and max(errs) < 1e-5, res.stdout


@pytest.mark.slow
@needs_gloo
def test_a_failing_rank_fails_the_launch_without_hanging(tmp_path: Path) -> None:
    model, x, _ = _skip_split()
    gm = trace(model, (x,), mode="fx")
    hand_plan(gm, lambda n: 0 if skip_stage(n) == 0 else 1, 2).save(tmp_path / "plan.json")
    t0 = time.monotonic()
    res = launch(
        2,
        f"{HERE}:failing_net",
        "--plan",
        str(tmp_path / "plan.json"),
        "--input-shape",
        "8,16",
        "--chunks",
        "2",
        "--timeout",
        "20",
    )
    assert res.returncode != 0
    assert "factory failed on purpose" in res.stderr
    assert re.search(r"rank \d: error: \w+: factory failed on purpose", res.stderr)
    # the failing rank prints its one line, not a traceback (MODELSPLIT_LOG=DEBUG adds it)
    assert "launch.py" not in res.stderr and 'File "' not in res.stderr.split("error:")[0]
    assert time.monotonic() - t0 < 60


# -- several stages per rank: interleaved-1f1b and zero-bubble ----------------------


class TiedNet(nn.Module):
    """``w`` is applied twice, on stages 0 and 2 of four; stage 2 also reads ``a`` and the
    batch size, made on stage 0, so both pass through stage 1. On 2 ranks x 2 virtual
    stages, or 1 x 4, one rank holds both uses of ``w``."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.w, self.fc1, self.fc3 = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        a = torch.relu(self.w(x))
        b = torch.tanh(self.fc1(a))
        c = self.w(b).reshape(n, -1) + a
        return self.fc3(c)


def tied_net() -> TiedNet:
    """Factory for the CLI (``tests/test_distributed.py:tied_net``)."""
    return TiedNet()


TIED_STAGES = {"fc1": 1, "tanh": 1, "w_1": 2, "reshape": 2, "add": 2, "fc3": 3}


def _tied_split(x: torch.Tensor) -> tuple[TiedNet, torch.fx.GraphModule, Plan]:
    torch.manual_seed(0)
    model = TiedNet()
    gm = trace(model, (x,), mode="fx")
    return model, gm, hand_plan(gm, lambda node: TIED_STAGES.get(node.name, 0), 4)


def test_schedule_names_are_the_planners() -> None:
    from partitioner.planner.schedules import SCHEDULES as PLANNED
    from runtime.distributed import SCHEDULES
    from runtime.distributed.launch import build_parser

    assert tuple(SCHEDULES) == tuple(PLANNED)
    choices = next(a.choices for a in build_parser()._actions if a.dest == "schedule")
    assert tuple(choices or ()) == tuple(PLANNED)


@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "zero-bubble"])
def test_check_schedule_refuses_the_chunks_torch_refuses(schedule: str) -> None:
    """Brute force against torch's own constructor (on stand-in stages): our check fails
    exactly where torch's would, and first."""
    from types import SimpleNamespace

    from runtime.distributed.placement import SCHEDULES, check_schedule

    def stand_ins(k: int, v: int) -> list[SimpleNamespace]:
        ids = range(0, k * v, k)
        return [
            SimpleNamespace(
                num_stages=k * v, group_size=k, group_rank=0, stage_index=s, submod=None
            )
            for s in ids
        ]

    refused = 0
    for k in range(1, 5):
        for v in range(1, 4):
            for m in range(1, 13):
                try:
                    SCHEDULES[schedule](stand_ins(k, v), m)
                    torch_ok = True
                except ValueError:
                    torch_ok = False
                try:
                    check_schedule(schedule, k, k * v, m, v)
                    ours_ok = True
                except ValueError as e:
                    assert "a multiple of" in str(e) and "rounds" in str(e)
                    ours_ok = False
                assert ours_ok == torch_ok, (k, v, m)
                refused += not ours_ok
    assert refused > 10  # the check is not vacuous: (2 ranks, 5 chunks) and more


def test_check_schedule_says_what_to_launch() -> None:
    from runtime.distributed.placement import check_schedule

    with pytest.raises(ModelSplitError, match=r"4 stages but 3 processes x 2 virtual stages = 6"):
        check_schedule("interleaved-1f1b", 3, 4, 4, 2)
    with pytest.raises(ModelSplitError, match=r"--nproc-per-node=2\b.*re-plan for 6 devices"):
        check_schedule("zero-bubble", 3, 4, 4, 2)
    with pytest.raises(ModelSplitError, match=r"keep 2 with --virtual-stages 2"):
        check_schedule("interleaved-1f1b", 2, 4, 4, 1)
    with pytest.raises(ValueError, match="gpipe runs one stage per rank"):
        check_schedule("gpipe", 2, 4, 4, 2)
    with pytest.raises(ValueError, match="1f1b needs at least one micro-batch per stage"):
        check_schedule("1f1b", 4, 4, 2)
    with pytest.raises(ValueError, match="schedule must be one of"):
        check_schedule("zb-v", 2, 2, 2)
    check_schedule("interleaved-1f1b", 2, 2, 2, 1)  # one stage per rank is allowed


def test_schedule_and_virtual_stages_default_to_the_plans() -> None:
    from types import SimpleNamespace

    from runtime.distributed.launch import _schedule_of, build_parser

    def resolved(plan: object, *argv: str) -> tuple[str, int]:
        args = build_parser().parse_args(
            ["m.py:f", "--input-shape", "4,4", "--chunks", "2", *argv]
        )
        _schedule_of(args, plan)
        return args.schedule, args.virtual_stages

    looped = SimpleNamespace(schedule="zero-bubble", virtual_stages=2)
    assert resolved(None) == ("gpipe", 1)
    assert resolved(SimpleNamespace(schedule=None, virtual_stages=1)) == ("gpipe", 1)
    assert resolved(looped) == ("zero-bubble", 2)
    assert resolved(looped, "--schedule", "interleaved-1f1b") == ("interleaved-1f1b", 2)
    assert resolved(looped, "--schedule", "1f1b") == ("1f1b", 1)
    assert resolved(looped, "--virtual-stages", "3") == ("zero-bubble", 3)


@needs_gloo
@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "zero-bubble"])
def test_one_rank_holding_every_stage_matches_the_unsplit_model(
    one_rank: None, schedule: str
) -> None:
    """1 rank x 4 virtual stages: the tied ``w`` is read on two stages of the rank, gets
    both gradients and is scaled by the micro-batch count once, not once per stage."""
    from runtime.distributed import DistributedPipeline

    x, y = torch.randn(8, 16), torch.randn(8, 16)
    model, _, plan = _tied_split(x)
    stages = split_for_ranks_of(model, x, plan)
    pipe = DistributedPipeline(
        stages,
        ((x,), {}),
        chunks=4,
        schedule=schedule,
        virtual_stages=4,
        loss_fn=nn.functional.mse_loss,
    )
    assert pipe.stage_ids == (0, 1, 2, 3) and pipe.is_first and pipe.is_last
    torch.testing.assert_close(pipe(x), model(x))
    pipe.train_step(x, target=y)
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    want = torch.autograd.grad(nn.functional.mse_loss(model(x), y), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), want, strict=True):
        torch.testing.assert_close(got[name], g, msg=name)
    pipe.train_step(x, target=y)  # a second step adds its gradients, as backward() does
    for (name, p), g in zip(model.named_parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, msg=name)


def split_for_ranks_of(
    model: nn.Module, x: torch.Tensor, plan: Plan
) -> list[torch.fx.GraphModule]:
    from runtime.distributed import split_for_ranks

    return split_for_ranks(model, (x,), {}, plan)


@pytest.mark.slow
@needs_gloo
def test_two_ranks_zero_bubble_plans_four_stages_and_trains_like_the_unsplit_model() -> None:
    """No --plan: rank 0 plans GPT for 2 x 2 stages; the LM head (stage 3, rank 1) and the
    embedding (stage 0, rank 0) share their weight across the ranks. GPT's stages return
    views and send strided input gradients, which zero-bubble's split backward refuses
    unless the relay copies them ([Note: relay])."""
    res = launch(
        2,
        f"{HERE}:gpt_tiny",
        "--input-shape",
        "4,8",
        "--dtype",
        "int64:64",
        "--chunks",
        "2",
        "--schedule",
        "zero-bubble",
        "--virtual-stages",
        "2",
        "--iters",
        "1",
        "--train",
        "--check",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    errs = _errs(res.stdout)
    assert len(errs) == 2 and max(errs) < 1e-5, res.stdout
    assert "(gradients, 4 stages)" in res.stdout
    assert "2 ranks x 2 stages, zero-bubble" in res.stdout


@pytest.mark.slow
@needs_gloo
def test_two_ranks_interleaved_relay_skips_and_sum_a_weight_tied_on_one_rank(
    tmp_path: Path,
) -> None:
    """Rank 0 holds stages 0 and 2, both reading ``w``; ``a`` and the batch size pass
    through stage 1 on rank 1 and back to rank 0."""
    x = torch.randn(8, 16)
    _, _, plan = _tied_split(x)
    plan.save(tmp_path / "plan.json")
    res = launch(
        2,
        f"{HERE}:tied_net",
        "--plan",
        str(tmp_path / "plan.json"),
        "--input-shape",
        "8,16",
        "--chunks",
        "4",
        "--schedule",
        "interleaved-1f1b",
        "--virtual-stages",
        "2",
        "--iters",
        "1",
        "--train",
        "--check",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    errs = _errs(res.stdout)
    assert len(errs) == 2 and max(errs) < 1e-5, res.stdout
    assert "2 ranks x 2 stages, interleaved-1f1b" in res.stdout


@pytest.mark.slow
@needs_gloo
def test_a_world_size_that_does_not_fit_the_virtual_stages_fails_at_once(
    tmp_path: Path,
) -> None:
    model, x, _ = _skip_split()
    gm = trace(model, (x,), mode="fx")
    hand_plan(gm, skip_stage, 3).save(tmp_path / "plan.json")
    t0 = time.monotonic()
    res = launch(
        2,
        f"{HERE}:skip_net",
        "--plan",
        str(tmp_path / "plan.json"),
        "--input-shape",
        "8,16",
        "--chunks",
        "2",
        "--schedule",
        "interleaved-1f1b",
        "--virtual-stages",
        "2",
        "--timeout",
        "20",
        timeout=60,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(
        r"rank \d: error: ModelSplitError: the plan has 3 stages but 2 processes x 2 virtual "
        r"stages = 4 run it: launch 3 processes with --virtual-stages 1, or re-plan for 4 devices",
        res.stderr,
    ), res.stderr
    assert time.monotonic() - t0 < 60
