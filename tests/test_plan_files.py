"""`modelsplit show` on files that are not plans: it fails at once, on one line, with exit 1.

A FIFO would block an `open` forever and /dev/zero would fill the memory, so each command
runs as a subprocess with a timeout: a regression fails here instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from partitioner.cli import EXIT_ERROR, EXIT_OK, main
from partitioner.planner.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]


def show(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="160")
    return subprocess.run(
        [sys.executable, "-m", "partitioner.cli", "show", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == EXIT_ERROR, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelsplit: error: "), done.stderr
    assert done.stdout == ""
    return lines[0]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_show_dev_zero_fails_at_once() -> None:
    line = one_error_line(show("/dev/zero"))
    assert "'/dev/zero' is a character device, not a regular file" in line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_show_a_fifo_fails_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)
    line = one_error_line(show(str(fifo)))
    assert "is a FIFO (a named pipe), not a regular file" in line


def test_show_a_directory_or_a_huge_file(tmp_path: Path) -> None:
    assert "is a directory" in one_error_line(show(str(tmp_path)))
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(2**30)  # sparse
    assert "over the 64 MiB a plan file may hold" in one_error_line(show(str(huge)))


def test_show_prints_the_plan_strings_as_text(tmp_path: Path, capsys) -> None:
    """A model or solver named like rich markup is printed as it is, not interpreted."""
    g = nx.DiGraph()
    g.add_node("a", time=1.0, param_bytes=0, out_bytes=1, act_bytes=0)
    g.add_node("b", time=1.0, param_bytes=0, out_bytes=1, act_bytes=0)
    g.add_edge("a", "b")
    plan = make_plan(
        g,
        {"a": 0, "b": 1},
        ["[red]cpu:0", "cpu:1[/]"],
        lower_bound=0.0,
        status="optimal",
        solver="[/bold]",
        model="[bold]Net[/]",
    )
    path = tmp_path / "plan.json"
    plan.save(path)
    code = main(["show", str(path)])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "[bold]Net[/] on 2 stages" in out and "[/bold] in" in out and "[red]cpu:0" in out
    assert main(["show", str(path), "--format", "json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == plan.to_dict()


# -- training plans: modelsplit.plan/2, and version-1 files still load -----------------------


def _training_doc() -> dict:
    """A saved training plan: 1f1b over two devices with two stages each is refused, so
    zero-bubble, V = 2, recomputation, a bandwidth matrix."""
    from partitioner.planner.cost import DeviceSpec
    from partitioner.planner.solver import solve

    g = nx.DiGraph()
    for i in range(8):
        g.add_node(f"b{i}", time=1.0, bwd_time=2.0, param_bytes=100, out_bytes=5, act_bytes=150)
        if i:
            g.add_edge(f"b{i - 1}", f"b{i}")
    devices = [DeviceSpec("cpu:0", memory=2000), DeviceSpec("cpu:1", memory=2000, speed=2.0)]
    plan = solve(
        g, devices, training=True, schedule="zero-bubble", virtual_stages=2, checkpoint=True,
        chunks=4, bandwidth=[[0.0, 1e9], [2e9, 0.0]], time_limit=5,
    )  # fmt: skip
    return plan.to_dict()


def test_a_training_plan_round_trips_as_version_2(tmp_path: Path) -> None:
    from partitioner.planner.plan import Plan

    doc = _training_doc()
    assert doc["schema"] == "modelsplit.plan/2" and doc["schedule"] == "zero-bubble"
    path = tmp_path / "plan.json"
    Plan.from_dict(doc).save(path)
    plan = Plan.load(path)
    assert plan.to_dict() == doc
    assert (plan.virtual_stages, plan.checkpoint, plan.num_stages) == (2, True, 4)
    assert plan.device_names == ["cpu:0", "cpu:1"]
    assert plan.devices == ["cpu:0", "cpu:1", "cpu:0", "cpu:1"]  # each stage's device
    assert plan.step_time == doc["step_time"] and plan.peak_memory == doc["peak_memory"]


def test_a_version_1_file_loads_with_the_inference_defaults(tmp_path: Path) -> None:
    from partitioner.planner.plan import Plan

    g = nx.DiGraph()
    g.add_node("a", time=1.0, param_bytes=0, out_bytes=1, act_bytes=0)
    g.add_node("b", time=1.0, param_bytes=0, out_bytes=1, act_bytes=0)
    g.add_edge("a", "b")
    doc = make_plan(
        g, {"a": 0, "b": 1}, 2, lower_bound=0.0, status="optimal", solver="h"
    ).to_dict()
    assert doc["schema"] == "modelsplit.plan/1" and "schedule" not in doc
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    plan = Plan.load(path)
    assert (plan.schedule, plan.virtual_stages, plan.checkpoint) == (None, 1, False)
    assert (plan.step_time, plan.peak_memory, plan.notes) == (None, None, [])
    assert plan.to_dict() == doc  # written back as version 1, unchanged
    with_field = dict(doc, schedule="1f1b")
    path.write_text(json.dumps(with_field))
    with pytest.raises(Exception, match="'schedule' is not a field of modelsplit.plan/1"):
        Plan.load(path)


BAD_TRAINING_FIELDS = [
    ("schedule", "pipedream", "plan field 'schedule' is \"pipedream\": write one of"),
    ("virtual_stages", 0, "plan field 'virtual_stages' is 0: write a whole number >= 1"),
    ("virtual_stages", 3, "plan field 'stages' lists 4 stages for 2 devices x 3 virtual"),
    ("checkpoint", 1, "plan field 'checkpoint' has the wrong type (1): write true or false"),
    ("checkpoint", "yes", "plan field 'checkpoint' has the wrong type (\"yes\")"),
    ("step_time", None, "plan field 'step_time' is null in a training plan"),
    ("step_time", -1.0, "plan field 'step_time' is -1.0: write a finite number >= 0"),
    ("peak_memory", [1, 2, 3], "plan field 'peak_memory' is a list of 3 for 2 devices"),
    ("peak_memory", [1.5, 2], "plan field 'peak_memory[0]' is 1.5: write a whole number"),
    ("peak_memory", None, "plan field 'peak_memory' is null for 2 devices"),
    ("notes", "why", "plan field 'notes' has the wrong type (\"why\")"),
    ("notes", [3], "plan field 'notes[0]' has the wrong type (3): write a string"),
    ("chunks", 5, "plan field 'schedule' \"zero-bubble\" does not run here"),
    ("schedule", None, "plan field 'virtual_stages' is 2 in a plan without a schedule"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_TRAINING_FIELDS)
def test_bad_training_fields_are_refused_by_name(field: str, value: object, message: str) -> None:
    from partitioner.errors import PlanError
    from partitioner.planner.plan import Plan

    doc = _training_doc()
    doc[field] = value
    with pytest.raises(PlanError) as info:
        Plan.from_dict(doc)
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text and "`modelsplit plan`" in text


def test_a_stage_on_the_wrong_device_of_an_interleaved_plan() -> None:
    from partitioner.errors import PlanError
    from partitioner.planner.plan import Plan

    doc = _training_doc()
    doc["stages"][2]["device"] = "cpu:1"
    with pytest.raises(PlanError, match=r"'stages\[2\].device' is \"cpu:1\" but devices\[0\]"):
        Plan.from_dict(doc)
