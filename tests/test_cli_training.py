"""`modelsplit plan --train` and `modelsplit show` of a training plan: the options reach
`solve`, the table shows the schedule, the step time, the peak memory and the notes."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest

from partitioner.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main
from partitioner.cli.render import fmt_bytes, fmt_time
from partitioner.planner.cost import DeviceSpec
from partitioner.planner.plan import Plan
from partitioner.planner.solver import solve

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "examples" / "models.py") + ":mlp"
SMALL = ["--factory-kwargs", '{"width": 64, "depth": 4}', "--input-shape", "32,64"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def training_plan(**kw: object) -> Plan:
    """A training plan of 8 equal blocks on two 2 KB devices, recomputed and interleaved."""
    g = nx.DiGraph()
    for i in range(8):
        g.add_node(f"b{i}", time=1e-3, bwd_time=2e-3, param_bytes=100, out_bytes=5,
                   act_bytes=150, order=i)  # fmt: skip
        if i:
            g.add_edge(f"b{i - 1}", f"b{i}")
    g.graph.update(training=True, model="Blocks")
    devices = [DeviceSpec("cpu:0", memory=2000), DeviceSpec("cpu:1", memory=2000)]
    kw = {"schedule": "zero-bubble", "virtual_stages": 2, "checkpoint": True, "chunks": 4, **kw}
    return solve(g, devices, time_limit=5, **kw)  # type: ignore[arg-type]


def test_show_prints_the_training_fields(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    plan = training_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    code, out, _ = _run(capsys, "show", str(path))
    assert code == EXIT_OK
    text = " ".join(out.split())  # rich may wrap a long note
    assert "zero-bubble, 4 micro-batches, 2 stages per device" in text
    assert "recomputing each stage's forward" in text
    assert f"{fmt_time(plan.step_time or 0)} per training step" in text
    assert f"{fmt_time(plan.lower_bound)} per step" in text
    assert f"{100 * plan.gap:.2f}% of the step time" in text
    peaks = plan.peak_memory or []
    assert f"cpu:0 {fmt_bytes(peaks[0])} / 2 KB, cpu:1 {fmt_bytes(peaks[1])} / 2 KB" in text
    for note in plan.notes:
        assert " ".join(note.split()) in text
    assert text.count("cpu:0") >= 2  # stages 0 and 2 both run there
    code, out, _ = _run(capsys, "show", str(path), "--format", "json")
    assert code == EXIT_OK and json.loads(out) == plan.to_dict()
    assert json.loads(out)["schema"] == "modelsplit.plan/2"


def test_plan_train_passes_the_options_to_solve(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "plan.json"
    args = ["plan", MLP, *SMALL, "--devices", "2", "--time-limit", "5", "-o", str(path)]
    code, out, err = _run(capsys, *args, "--train", "--schedule", "1f1b", "--checkpoint", "off")
    assert code == EXIT_OK, err
    plan = Plan.load(path)
    assert plan.schedule == "1f1b" and plan.virtual_stages == 1 and not plan.checkpoint
    assert plan.step_time is not None and plan.step_time > 0
    assert plan.chunks in (2, 4, 8)  # "auto" without --chunks: 2, 4 or 8 of the 32 rows
    assert "step time" in out and "peak memory" in out
    code, _, err = _run(capsys, *args, "--train", "--chunks", "4", "--schedule", "zero-bubble",
                        "--virtual-stages", "2")  # fmt: skip
    assert code == EXIT_OK, err
    plan = Plan.load(path)
    assert (plan.schedule, plan.chunks, plan.virtual_stages) == ("zero-bubble", 4, 2)
    assert plan.devices == [plan.device_names[s % 2] for s in range(4)]


def test_plan_without_train_is_an_inference_plan(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "plan.json"
    code, _, err = _run(capsys, "plan", MLP, *SMALL, "--devices", "2", "--time-limit", "5",
                        "-o", str(path))  # fmt: skip
    assert code == EXIT_OK, err
    assert json.loads(path.read_text())["schema"] == "modelsplit.plan/1"
    assert Plan.load(path).schedule is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--schedule", "1f1b"], "--schedule applies to training plans: add --train"),
        (["--checkpoint", "on"], "--checkpoint applies to training plans"),
        (["--train", "--virtual-stages", "two"], "--virtual-stages two: give auto or a whole"),
        (["--train", "--virtual-stages", "0"], "--virtual-stages 0"),
        (["--train", "--schedule", "gpipe", "--virtual-stages", "2"], "one stage per device"),
        (["--train", "--objective", "balanced-cut"], "is for inference plans"),
        (["--train", "--schedule", "pipedream"], "invalid choice: 'pipedream'"),
    ],
)
def test_bad_training_options_are_usage_errors(extra: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = _run(capsys, "plan", MLP, *SMALL, "--devices", "2", *extra)
    assert code == EXIT_USAGE
    assert message in err and out == ""


def test_run_refuses_an_interleaved_plan(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "plan.json"
    training_plan().save(path)
    code, _, err = _run(capsys, "run", MLP, *SMALL, "--plan", str(path))
    assert code == EXIT_ERROR
    assert "2 stages on each device" in err and "--virtual-stages 1" in err
