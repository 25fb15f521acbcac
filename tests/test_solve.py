"""solve: bad input, memory, statuses, devices, bandwidth matrices, objectives, solvers."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys

import networkx as nx
import pytest
from strategies import transformer_graph

from partitioner import DeviceSpec, InfeasiblePlanError, evaluate
from partitioner.planner.balanced import balanced
from partitioner.planner.baselines import POLICIES, baseline
from partitioner.planner.ilp import IlpResult, available_solvers, solve_ilp
from partitioner.planner.solver import solve

solve_module = importlib.import_module("partitioner.planner.solver")


def chain(times: list[float], out: int = 10, mem: int = 0) -> nx.DiGraph:
    g = nx.DiGraph()
    for i, t in enumerate(times):
        g.add_node(f"n{i}", time=t, param_bytes=mem, out_bytes=out, act_bytes=0, order=i)
        if i:
            g.add_edge(f"n{i - 1}", f"n{i}")
    return g


def test_splits_a_chain_evenly() -> None:
    plan = solve(chain([1.0] * 8), 4, bandwidth=1e9)
    assert plan.num_stages == 4
    assert [s.nodes for s in plan.stages] == [2, 2, 2, 2]
    assert plan.status == "optimal"
    assert plan.gap <= 0.01
    assert plan.solver in available_solvers()


@pytest.mark.parametrize(
    ("devices", "match"),
    [(0, "positive integer"), (-2, "positive integer"), ([], "empty")],
)
def test_bad_devices(devices: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        solve(chain([1.0]), devices)  # type: ignore[arg-type]


def test_cycle_and_bad_attributes_are_value_errors() -> None:
    g = chain([1.0, 1.0])
    g.add_edge("n1", "n0")
    with pytest.raises(ValueError, match="cycle"):
        solve(g, 2)
    g = chain([1.0, -1.0])
    with pytest.raises(ValueError, match="time must be finite and >= 0"):
        solve(g, 2)
    g = chain([1.0, 1.0])
    del g.nodes["n1"]["out_bytes"]
    with pytest.raises(ValueError, match="missing attribute 'out_bytes'"):
        solve(g, 2)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"objective": "latency"}, "objective"),
        ({"solver": "gurobi"}, "solver"),
        ({"gap": 1.5}, "gap"),
        ({"time_limit": 0}, "time_limit"),
        ({"imbalance": -0.1}, "imbalance"),
        ({"bandwidth": 0.0}, "bandwidth"),
    ],
)
def test_bad_arguments(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        solve(chain([1.0, 1.0]), 2, **kw)  # type: ignore[arg-type]


def test_memory_errors_say_what_is_needed() -> None:
    g = chain([1.0] * 4, mem=100)
    with pytest.raises(InfeasiblePlanError, match="400 B in all and 100 B for its largest node"):
        solve(g, [DeviceSpec("a", 150), DeviceSpec("b", 150)])
    with pytest.raises(InfeasiblePlanError, match="largest node"):
        solve(g, [DeviceSpec(f"a{k}", 90) for k in range(5)])


def test_memory_infeasible_beyond_the_fast_checks() -> None:
    # each node fits, the total fits, but 3 x 100 cannot be packed into 150 + 150
    g = chain([1.0] * 3, mem=100)
    with pytest.raises(InfeasiblePlanError):
        solve(g, [DeviceSpec("a", 150), DeviceSpec("b", 150)])


def test_memory_limits_shape_the_plan() -> None:
    g = chain([1.0] * 4, mem=100)
    plan = solve(g, [DeviceSpec("a", 100), DeviceSpec("b", 300)], bandwidth=1e9)
    assert [s.nodes for s in plan.stages] == [1, 3]


def test_more_devices_than_useful_gives_fewer_stages() -> None:
    plan = solve(chain([1.0, 1.0]), 6, bandwidth=1e9)
    assert plan.num_stages == 2
    assert sorted(set(plan.assignment.values())) == [0, 1]


def test_communication_can_make_one_stage_best() -> None:
    plan = solve(chain([1.0] * 4, out=10**6), 4, bandwidth=1.0)
    assert plan.num_stages == 1
    assert plan.status == "optimal"


def test_heterogeneous_speeds() -> None:
    specs = [DeviceSpec("slow", speed=1.0), DeviceSpec("fast", speed=3.0)]
    plan = solve(chain([1.0] * 8), specs, bandwidth=1e9)
    assert [s.nodes for s in plan.stages] == [2, 6]
    assert plan.devices == ["slow", "fast"]


def test_bandwidth_matrix_figures_equal_evaluate() -> None:
    g = chain([1.0] * 6, out=100)
    bw = [[0.0, 100.0, 1.0], [100.0, 0.0, 1000.0], [1.0, 1000.0, 0.0]]
    plan = solve(g, 3, bandwidth=bw)
    ev = evaluate(g, plan.assignment, plan.device_specs, plan.bandwidth)
    assert ev.bottleneck == plan.bottleneck
    assert plan.lower_bound <= plan.bottleneck


def test_balanced_cut_keeps_balance_and_cuts_less() -> None:
    g = chain([1.0] * 8, out=10)
    g.nodes["n3"]["out_bytes"] = 1  # the cheap cut is off-centre
    fast = solve(g, 2, bandwidth=1.0)
    cut = solve(g, 2, bandwidth=1.0, objective="balanced-cut", imbalance=0.25)
    assert cut.objective == "balanced-cut"
    assert balanced(g, cut.assignment, cut.device_specs, 0.25)
    assert cut.comm_bytes == 1 < fast.comm_bytes or fast.comm_bytes == 1


def test_balanced_cut_impossible_raises() -> None:
    with pytest.raises(InfeasiblePlanError, match="imbalance"):
        solve(chain([10.0, 1.0]), 2, objective="balanced-cut", imbalance=0.0)


@pytest.mark.skipif("cbc" not in available_solvers(), reason="CBC not installed")
def test_cbc_matches_highs() -> None:
    g = transformer_graph(2, hidden=64, seq=8, vocab=100, rate=1e9)
    a = solve(g, 3, solver="cbc", time_limit=10)
    b = solve(g, 3, solver="highs", time_limit=10)
    assert a.solver == "cbc"
    assert a.bottleneck == pytest.approx(b.bottleneck, rel=0.02)


def test_gpt_like_graph_beats_the_baselines() -> None:
    g = transformer_graph(4, hidden=256, seq=64, vocab=8000, rate=1e12)
    plan = solve(g, 4, bandwidth=12e9, time_limit=10)
    assert plan.status == "optimal"
    worst = max(baseline(g, 4, p, bandwidth=12e9).bottleneck for p in ("uniform", "parameters"))
    assert worst > 1.3 * plan.bottleneck  # the LM head unbalances layer counts


def test_no_ilp_solution_returns_the_heuristic_plan(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def nothing(*args: object, **kwargs: object) -> IlpResult:
        return IlpResult(None, 0.0, False, False, "highs", 0.0)

    monkeypatch.setattr(solve_module, "solve_ilp", nothing)
    monkeypatch.setattr(solve_module, "fine_lower_bound", lambda *a, **k: 0.0)
    with caplog.at_level(logging.WARNING, logger="partitioner.planner.solver"):
        plan = solve(chain([1.0, 2.0, 3.0]), 2)
    assert plan.status == "heuristic"
    assert "no solution" in caplog.text
    assert evaluate(chain([1.0, 2.0, 3.0]), plan.assignment, plan.device_specs).valid


def test_unproven_time_limit_is_feasible(monkeypatch: pytest.MonkeyPatch) -> None:
    def weak(inp, specs, bw, **kw):  # type: ignore[no-untyped-def]
        res = solve_ilp(inp, specs, bw, **kw)
        return IlpResult(res.stage, 0.0, False, False, res.solver, res.seconds)

    monkeypatch.setattr(solve_module, "solve_ilp", weak)
    monkeypatch.setattr(solve_module, "fine_lower_bound", lambda *a, **k: 0.0)
    plan = solve(chain([1.0, 2.0, 3.0, 1.0]), 2)
    assert plan.status == "feasible"
    assert plan.lower_bound < plan.bottleneck


def test_warm_start_is_used_under_a_tiny_time_limit() -> None:
    from partitioner.planner.coarsen import identity
    from partitioner.planner.heuristics import index_graph
    from partitioner.planner.levels import level_of

    g = transformer_graph(3, hidden=64, seq=8, vocab=100, rate=1e9)
    level = level_of(identity(g), index_graph(g))
    start = [min(i * 4 // level.n, 3) for i in range(level.n)]
    res = solve_ilp(
        level.inp, [DeviceSpec(f"d{k}") for k in range(4)], 1e9, start=start, time_limit=0.01
    )
    assert res.stage is not None


def test_plans_record_what_they_were_made_for() -> None:
    plan = solve(chain([1.0, 1.0]), 2, chunks=4, signature=[["x", [8, 4]]], model="M")
    assert (plan.chunks, plan.signature, plan.model) == (4, [["x", [8, 4]]], "M")
    assert plan.solve_time > 0
    assert set(POLICIES) == {"uniform", "parameters", "greedy-memory", "time-dp", "layer-dp"}


# -- the host process: a user's own HiGHS, stdout, isolated nodes ---------------------------

_USER_HIGHS_FIRST = """
import networkx as nx, pulp
p = pulp.LpProblem("user", pulp.LpMinimize)
x = pulp.LpVariable("x", 0, 3, cat="Integer")
p += x
p += x >= 1
if {user}:
    p.solve(pulp.HiGHS(msg=False{threads}))
    assert pulp.LpStatus[p.status] == "Optimal"
from partitioner import solve
g = nx.DiGraph()
for i in range(24):
    g.add_node(f"n{{i}}", time=1.0 + (i % 5) / 7, param_bytes=0, out_bytes=1000 * (i % 3 + 1),
               act_bytes=0)
    if i:
        g.add_edge(f"n{{i - 1}}", f"n{{i}}")
    if i >= 3 and i % 3 == 0:
        g.add_edge(f"n{{i - 3}}", f"n{{i}}")
plan = solve(g, devices=4, bandwidth=1e5, solver="highs", time_limit=20)
print(plan.status, plan.solver, plan.bottleneck, plan.gap <= 0.01)
"""


def _plan_line(user: bool, threads: str = "") -> str:
    run = subprocess.run(
        [sys.executable, "-c", _USER_HIGHS_FIRST.format(user=user, threads=threads)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()[-1]


@pytest.mark.skipif("highs" not in available_solvers(), reason="needs HiGHS")
@pytest.mark.parametrize("threads", ["", ", threads=2", ", threads=1"])
def test_a_users_highs_run_first_does_not_throw_the_ilp_away(threads: str) -> None:
    # HiGHS keeps one thread scheduler per process: a solve that set its own `threads`
    # after the user's run got "Not Solved" and fell back to a heuristic plan.
    alone = _plan_line(user=False)
    assert alone.split()[:2] == ["optimal", "highs"], alone
    assert alone.split()[3] == "True", alone
    assert _plan_line(user=True, threads=threads) == alone


@pytest.mark.skipif("highs" not in available_solvers(), reason="needs HiGHS")
def test_solve_prints_nothing_on_stdout() -> None:
    code = (
        "import networkx as nx\n"
        "from partitioner import solve\n"
        "g = nx.DiGraph()\n"
        "g.add_node('a', time=1.0, param_bytes=0, out_bytes=8, act_bytes=0)\n"
        "g.add_node('b', time=1.0, param_bytes=0, out_bytes=8, act_bytes=0)\n"
        "g.add_edge('a', 'b')\n"
        "solve(g, devices=2, bandwidth=1e9, solver='highs')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "", f"the planner wrote to stdout: {run.stdout!r}"


@pytest.mark.parametrize("solver", available_solvers())
def test_an_isolated_node_keeps_the_proven_plan(solver: str) -> None:
    # An unused tied get_attr or BatchNorm's num_batches_tracked: no edges, no time, no
    # memory, so its variable is in no constraint and the solver returns no value for it.
    g = chain([1.0, 2.0, 1.0, 2.0])
    g.add_node("num_batches_tracked", time=0.0, param_bytes=0, out_bytes=8, act_bytes=0)
    plan = solve(g, 2, bandwidth=1e9, solver=solver, coarsen=False)
    assert plan.status == "optimal", plan.status
    assert plan.solver == solver
    assert plan.bottleneck == pytest.approx(3.0)
    assert "num_batches_tracked" in plan.assignment


_USER_HIGHS_AFTER = """
import networkx as nx, pulp
from partitioner import solve
g = nx.DiGraph()
for i in range(24):
    g.add_node(f"n{{i}}", time=1.0 + (i % 5) / 7, param_bytes=0, out_bytes=1000 * (i % 3 + 1),
               act_bytes=0)
    if i:
        g.add_edge(f"n{{i - 1}}", f"n{{i}}")
plan = solve(g, devices=4, bandwidth=1e5, solver="highs", time_limit=20)
p = pulp.LpProblem("user", pulp.LpMinimize)
x = pulp.LpVariable("x", 0, 3, cat="Integer")
p += x
p += x >= 1
p.solve(pulp.HiGHS(msg=False, threads={threads}))
print(plan.status, pulp.LpStatus[p.status])
"""


@pytest.mark.skipif("highs" not in available_solvers(), reason="needs HiGHS")
@pytest.mark.parametrize("threads", [1, 3])
def test_a_users_highs_run_after_a_solve_keeps_its_threads(threads: int) -> None:
    # solve runs HiGHS on a worker thread, whose thread scheduler is its own: when it ran
    # on the caller's thread, a later user run with its own `threads` got "Not Solved".
    run = subprocess.run(
        [sys.executable, "-c", _USER_HIGHS_AFTER.format(threads=threads)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].split() == ["optimal", "Optimal"], run.stdout
