"""`modelsplit plan | show | run | compare`: the happy paths and each bad input.

Subprocess tests pay the torch import (~2 s each), so the happy path runs once
per command as a subprocess and the rest in-process through `main(argv)`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from partitioner.cli import EXIT_ERROR, EXIT_INFEASIBLE, EXIT_OK, EXIT_USAGE, main
from partitioner.planner.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "examples" / "models.py") + ":mlp"
SMALL = ["--factory-kwargs", '{"width": 64, "depth": 4}', "--input-shape", "32,64"]
FAST = ["--time-limit", "5"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="160")
    return subprocess.run(
        [sys.executable, "-m", "partitioner.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=240,
    )


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """`modelsplit plan` of the small MLP on 2 devices, run once as a subprocess."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    return out, cli("plan", MLP, *SMALL, *FAST, "--devices", "2", "-o", str(out))


@pytest.fixture
def plan_file(planned: tuple[Path, Any]) -> Path:
    path, done = planned
    assert done.returncode == EXIT_OK, done.stderr
    return path


# -- subprocess: the commands as users type them ------------------------------------------


def test_plan_prints_the_table_and_writes_the_plan(planned: tuple[Path, Any]) -> None:
    out, done = planned
    assert done.returncode == EXIT_OK, done.stderr
    for word in ("stage", "device", "first op", "bytes in", "bottleneck", "lower bound", "gap"):
        assert word in done.stdout
    assert f"wrote {out}" in done.stderr
    plan = Plan.load(out)
    assert plan.model == "MLP" and 1 <= plan.num_stages <= 2
    assert "Traceback" not in done.stderr


def test_run_checks_the_plan_and_writes_a_timeline(plan_file: Path, tmp_path: Path) -> None:
    trace = tmp_path / "timeline.json"
    done = cli("run", MLP, *SMALL, "--plan", str(plan_file), "--iters", "2", "--trace", str(trace))
    assert done.returncode == EXIT_OK, done.stderr
    assert "max error" in done.stdout and "samples/s" in done.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    plan = Plan.load(plan_file)
    forward = [e for e in events if e.get("cat") == "forward"]
    # a slice per (micro-batch, stage) per iteration
    assert len(forward) == 2 * plan.chunks * plan.num_stages
    assert {e["tid"] for e in forward} == set(range(1, plan.num_stages + 1))


BAD_INPUTS = {
    "zero devices": (["plan", MLP, *SMALL, "--devices", "0"], EXIT_USAGE, "at least one device"),
    "missing file": (
        ["plan", "no/such/file.py:mlp", "--input-shape", "32,64", "--devices", "2"],
        EXIT_USAGE,
        "does not exist",
    ),
    "missing factory": (
        ["plan", "models.py:nope", "--input-shape", "32,64", "--devices", "2"],
        EXIT_USAGE,
        "no factory 'nope'; it defines mlp",
    ),
    "malformed shape": (
        ["plan", MLP, "--input-shape", "32,sixty-four", "--devices", "2"],
        EXIT_USAGE,
        "malformed input shape",
    ),
    "shape the model rejects": (
        ["plan", MLP, *SMALL[:2], "--input-shape", "32,63", "--devices", "2"],
        EXIT_USAGE,
        "rejects inputs of shape 32,63 (float32)",
    ),
    "time limit zero": (
        ["plan", MLP, *SMALL, "--devices", "2", "--time-limit", "0"],
        EXIT_USAGE,
        "--time-limit 0: give seconds > 0",
    ),
    "gap nan": (
        ["plan", MLP, *SMALL, "--devices", "2", "--gap", "nan"],
        EXIT_USAGE,
        "--gap nan: give a fraction in [0, 1)",
    ),
    "memory overflow": (
        ["plan", MLP, *SMALL, "--devices", "2", "--memory", "1e400"],
        EXIT_USAGE,
        "the number is too large",
    ),
    "absurd device count": (
        ["plan", MLP, *SMALL, "--devices", "99999999999999999999"],
        EXIT_USAGE,
        "at most 4096 devices",
    ),
    "negative tolerance": (
        ["run", MLP, *SMALL, "--plan", "plan.json", "--atol", "-1"],
        EXIT_USAGE,
        "--atol -1: give a tolerance >= 0",
    ),
    "memory too small": (
        ["plan", MLP, *SMALL, *FAST, "--devices", "2", "--memory", "10KB"],
        EXIT_INFEASIBLE,
        "raise --memory",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_an_exit_code(case: str, tmp_path: Path) -> None:
    args, code, message = BAD_INPUTS[case]
    (tmp_path / "models.py").write_text("def mlp():\n    pass\n")  # no torch: fails fast
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelsplit: error: "), done.stderr
    assert message in lines[0]
    assert not (tmp_path / "plan.json").exists()


def test_corrupt_plan_file(tmp_path: Path) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text('{"schema": "modelsplit.plan/1", "assignment": ')
    done = cli("run", MLP, *SMALL, "--plan", str(bad))
    assert done.returncode == EXIT_ERROR
    assert done.stderr.strip().count("\n") == 0
    assert "not valid JSON" in done.stderr and "modelsplit plan" in done.stderr


# -- in-process: the remaining paths ------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_for_another_model(plan_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = str(ROOT / "examples" / "models.py") + ":my_model"
    code, _, err = _run(capsys, "run", other, "--input-shape", "8,64", "--plan", str(plan_file))
    assert code == EXIT_ERROR
    assert "another model" in err and "'model'" in err


def test_plan_nodes_the_model_lacks(plan_file: Path, tmp_path: Path, capsys) -> None:
    data = json.loads(plan_file.read_text())
    data["assignment"]["ghost"] = 0
    bad = tmp_path / "ghost.json"
    bad.write_text(json.dumps(data))
    code, _, err = _run(capsys, "run", MLP, *SMALL, "--plan", str(bad), "--iters", "1")
    assert code == EXIT_ERROR
    assert "does not have" in err and "ghost" in err


def test_stages_out_of_order(plan_file: Path, tmp_path: Path, capsys) -> None:
    data = json.loads(plan_file.read_text())
    if len(data["stages"]) < 2:
        pytest.skip("the planner used one stage")
    last = data["stages"][-1]["last"]  # the model's last op, read from stage 1
    data["assignment"] = {v: (0 if v == last else 1) for v in data["assignment"]}
    bad = tmp_path / "backwards.json"
    bad.write_text(json.dumps(data))
    code, _, err = _run(capsys, "run", MLP, *SMALL, "--plan", str(bad), "--iters", "1")
    assert code == EXIT_ERROR
    assert "goes backwards" in err


def test_device_count_mismatch(plan_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = Plan.load(plan_file).num_stages
    names = ",".join(f"cpu:{k}" for k in range(n + 1))
    code, _, err = _run(capsys, "run", MLP, *SMALL, "--plan", str(plan_file), "--devices", names)
    assert code == EXIT_ERROR
    assert f"--devices names {n + 1}" in err and "'devices'" in err


def test_unknown_schema(plan_file: Path, tmp_path: Path, capsys) -> None:
    data = json.loads(plan_file.read_text())
    data["schema"] = "modelsplit.plan/99"
    bad = tmp_path / "future.json"
    bad.write_text(json.dumps(data))
    code, _, err = _run(capsys, "show", str(bad))
    assert code == EXIT_ERROR and "unknown plan schema" in err


def test_show_formats(plan_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "show", str(plan_file))
    assert code == EXIT_OK and "bottleneck" in out and "cpu:0" in out
    code, out, _ = _run(capsys, "show", str(plan_file), "--format", "json")
    assert code == EXIT_OK and json.loads(out) == json.loads(plan_file.read_text())
    code, out, _ = _run(capsys, "show", str(plan_file), "--format", "dot")
    assert code == EXIT_OK and out.startswith("digraph")


def test_plan_dot_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["plan", MLP, *SMALL, *FAST, "--devices", "2", "-o", "-"]
    code, out, _ = _run(capsys, *common, "--format", "dot")
    assert code == EXIT_OK
    assert out.startswith("digraph") and "cluster_0" in out and "layers" in out
    code, out, _ = _run(capsys, *common, "--json")
    assert code == EXIT_OK and json.loads(out)["schema"] == "modelsplit.plan/1"


def test_svg_without_graphviz_keeps_the_dot_file(tmp_path: Path, capsys, monkeypatch) -> None:
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    svg = tmp_path / "plan.svg"
    code, _, err = _run(
        capsys, "plan", MLP, *SMALL, *FAST, "--devices", "2", "-o", "-", "--svg", str(svg), "-q"
    )
    assert code == EXIT_ERROR
    assert "apt-get install graphviz" in err
    assert (tmp_path / "plan.dot").read_text().startswith("digraph")


def test_compare_lists_the_ilp_and_each_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "compare", MLP, *SMALL, *FAST, "--devices", "2", "--json")
    assert code == EXIT_OK
    rows = json.loads(out)
    assert [r["policy"] for r in rows] == [
        "ilp",
        "uniform",
        "parameters",
        "greedy-memory",
        "time-dp",
        "layer-dp",
    ]
    assert rows[0]["ratio"] == 1.0
    for row in rows[1:]:
        if "bottleneck" in row:
            assert row["ratio"] >= 1.0 - 1e-9


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "show", "no-such-plan.json", "--debug")
    assert code == EXIT_ERROR
    assert "Traceback" in err and "cannot read plan file" in err
    code, _, err = _run(capsys, "show", "no-such-plan.json")
    assert "Traceback" not in err and err.count("\n") == 1


def test_usage_errors_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["plan", MLP, *SMALL, "--devices", "2", "--memory", "lots"],
        ["plan", MLP, *SMALL, "--devices", "2", "--bandwidth", "fast"],
        ["plan", MLP, *SMALL, "--devices", "2", "--factory-kwargs", "{width: 64}"],
        ["plan", MLP, "--devices", "2"],
        ["plan", MLP, *SMALL, "--devices", "2", "--dtype", "float33"],
        ["run", MLP, *SMALL],
        ["frobnicate"],
    ):
        code, _, err = _run(capsys, *argv)
        assert code == EXIT_USAGE, (argv, err)
        assert err.count("\n") == 1 and err.startswith("modelsplit: error: "), err


def test_infeasible_split_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    # 70 KB in all holds the 66.6 KB of weights, but no split fits 35 KB per device.
    argv = ["plan", MLP, *SMALL, *FAST, "--devices", "2", "--memory", "35KB", "-o", "-"]
    code, out, err = _run(capsys, *argv)
    assert code == EXIT_INFEASIBLE, err
    assert err.startswith("modelsplit: error: ") and err.count("\n") == 1
    assert out == ""


# -- the loader, directly -----------------------------------------------------------------


def test_shapes_and_dtypes() -> None:
    from partitioner.loader import UsageError, input_specs, parse_dtype, parse_shape

    assert parse_shape("32,64") == (32, 64) == parse_shape(" 32 x 64 ")
    for bad in ("", "32,", "0,4", "-1", "a"):
        with pytest.raises(UsageError, match="malformed input shape"):
            parse_shape(bad)
    assert parse_dtype("int64:50257") == ("int64", 50257)
    assert parse_dtype("half") == ("float16", 2)
    with pytest.raises(UsageError, match="integer dtypes only"):
        parse_dtype("float32:4")
    specs = input_specs(["8,16", "8"], ["int64:10"])
    assert [(s.shape, s.dtype, s.high) for s in specs] == [
        ((8, 16), "int64", 10),
        ((8,), "int64", 10),
    ]
    with pytest.raises(UsageError, match="2 --dtype for 3 --input-shape"):
        input_specs(["1", "2", "3"], ["int64", "float32"])


def test_inputs_and_keyword_tensors() -> None:
    import torch

    from partitioner.loader import build_inputs, input_specs

    args, kwargs = build_inputs(
        input_specs(["4,6"], ["int64:7"]),
        {"mask": {"shape": [4, 6], "dtype": "bool"}, "use_cache": False},
    )
    assert args[0].dtype == torch.int64 and int(args[0].min()) >= 0 and int(args[0].max()) < 7
    assert kwargs["mask"].dtype == torch.bool and kwargs["mask"].shape == (4, 6)
    assert kwargs["use_cache"] is False
    again, _ = build_inputs(input_specs(["4,6"], ["int64:7"]), {})
    assert torch.equal(args[0], again[0])  # seeded


def test_factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from partitioner.loader import UsageError, load_model

    monkeypatch.chdir(ROOT)
    model = load_model("examples.models:mlp", {"width": 8, "depth": 1})
    assert type(model).__name__ == "MLP"
    with pytest.raises(UsageError, match="rejects --factory-kwargs"):
        load_model(MLP, {"colour": "red"})
    odd = tmp_path / "odd.py"
    odd.write_text("def three():\n    return 3\n")
    with pytest.raises(UsageError, match="returned a value of type int, not a torch.nn.Module"):
        load_model(f"{odd}:three")
    with pytest.raises(UsageError, match="no module named 'no_such_pkg.models'"):
        load_model("no_such_pkg.models:mlp")
    with pytest.raises(UsageError, match="must be 'path/to/file.py:factory'"):
        load_model("examples/models.py")


@pytest.mark.parametrize("backward", ["autograd", "pipelined"])
def test_run_train_checks_gradients(
    plan_file: Path, backward: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", MLP, *SMALL, "--plan", str(plan_file), "--iters", "1", "--warmup", "0"]
    code, out, err = _run(capsys, *argv, "--train", "--backward", backward, "--json")
    assert code == EXIT_OK, err
    train = json.loads(out)["train"]
    assert train["ok"] and train["backward"] == backward
    assert train["max_grad_error"] < 1e-5 and train["throughput"] > 0


def test_default_chunks_shrink_to_a_small_batch_and_say_so(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    small = ["--factory-kwargs", '{"width": 16, "depth": 2}', "--input-shape", "4,16"]
    run = cli("plan", MLP, *small, *FAST, "--devices", "4", "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert "4 micro-batches, one per row: the default 8 exceeds the batch size 4" in run.stderr
    assert json.loads(out.read_text())["chunks"] == 4
    given = cli("plan", MLP, *small, *FAST, "--devices", "4", "--chunks", "8", "-o", "-")
    assert given.returncode == 2 and "--chunks 8 exceeds the batch size 4" in given.stderr


def test_integer_inputs_without_a_range_say_which_range(tmp_path: Path) -> None:
    gpt = str(ROOT / "examples" / "models.py") + ":gpt"
    config = '{"vocab": 64, "dim": 16, "layers": 1, "heads": 2, "max_len": 16}'
    args = ["--factory-kwargs", config, "--input-shape", "4,8", *FAST, "--devices", "2"]
    run = cli("plan", gpt, *args, "--dtype", "int64", "-o", "-", "--format", "json")
    assert run.returncode == 0, run.stderr
    assert "integers are drawn from [0, 2); give int64:N" in run.stderr
    ranged = cli("plan", gpt, *args, "--dtype", "int64:64", "-o", "-", "--format", "json")
    assert ranged.returncode == 0 and "drawn from" not in ranged.stderr


def test_a_model_file_that_exits_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text("import sys\nsys.exit(3)\n\ndef mlp():\n    pass\n")
    done = cli("plan", "script.py:mlp", "--input-shape", "4,4", "--devices", "2", cwd=tmp_path)
    assert done.returncode == EXIT_USAGE, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "importing script.py called sys.exit(3)" in lines[0]


def test_run_compares_nan_with_nan_in_place() -> None:
    import torch

    from partitioner.cli.run import _close, max_error

    a = torch.tensor([1.0, float("nan"), float("inf")])
    assert max_error(a, a.clone()) == 0.0 and _close(a, a.clone(), 0.0, 0.0)
    b = torch.tensor([1.0, 2.0, float("inf")])
    assert max_error(a, b) == float("inf") and not _close(a, b, 1e-3, 1e-3)
