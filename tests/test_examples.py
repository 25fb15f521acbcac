"""The examples run as users run them: the quickstart (the README's main job) and training."""

from __future__ import annotations

import pytest

from examples import quickstart, train


def test_quickstart_runs_and_checks_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert quickstart.main() == 0
    assert "OK: split output equals the unsplit model" in capsys.readouterr().out


@pytest.mark.parametrize("backward", ["autograd", "pipelined"])
def test_training_example_tracks_the_unsplit_model(
    backward: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train.main(["--steps", "2", "--backward", backward]) == 0
    assert "track the unsplit model" in capsys.readouterr().out
