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
