"""The README's examples run as printed, from an empty folder (no checkout on the path)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def _env() -> dict[str, str]:
    # The installed package, as a user has it; PYTHONPATH only in case the editable
    # install predates a new top-level package. The checkout is never the working folder.
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_readme_fits_its_budget() -> None:
    assert len(README.splitlines()) <= 450


def test_quickstart_runs_from_an_empty_folder(tmp_path: Path) -> None:
    code = re.search(r"```python\n(.*?)```", _section("Quickstart"), re.S)
    assert code is not None
    assert "examples.models" not in code.group(1)
    run = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "plan.json").is_file()


def _cli_lines() -> list[list[str]]:
    block = re.search(r"```console\n(.*?)```", _section("The command line in one screen"), re.S)
    assert block is not None
    text = block.group(1).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("$ modelsplit "):
            commands.append(shlex.split(line[2:])[1:])
    return commands


@pytest.mark.slow
def test_cli_examples_run_from_an_empty_folder(tmp_path: Path) -> None:
    commands = _cli_lines()
    assert [c[0] for c in commands] == ["plan", "show", "run", "compare"]
    for args in commands:
        run = subprocess.run(
            [sys.executable, "-m", "partitioner.cli", *args],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, f"modelsplit {shlex.join(args)}: {run.stderr}"
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "timeline.json").is_file()
