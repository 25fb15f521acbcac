"""runtime.allocator: glibc's malloc keeps freed memory for CPU stages ([Note: CPU allocator])."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

import runtime.allocator as allocator
from runtime import Pipeline

ROOT = Path(__file__).resolve().parents[1]

# Each round allocates and frees 2 x 48 MiB in a new thread, as a step's workers do; the
# script prints the minor page faults of 10 rounds after 10 rounds of warm-up. glibc maps
# blocks over 32 MiB (its largest mmap threshold) afresh on every allocation by default.
_FAULTS = textwrap.dedent(
    """
    import resource, sys, threading, torch
    from runtime import Pipeline
    from torch import nn
    if sys.argv[1] == "pipeline":
        Pipeline([nn.Identity()], ["cpu"], chunks=1)  # a CPU pipeline tunes malloc
    def step():
        x = torch.ones(12 * 1024 * 1024)
        y = x * 2
        del x, y
    def rounds():
        for _ in range(10):
            t = threading.Thread(target=step)
            t.start()
            t.join()
    rounds()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "MODELSPLIT_"))}
    clean.update(env, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(res.stdout.strip().splitlines()[-1])


def _glibc() -> bool:
    return sys.platform.startswith("linux") and allocator._why_not() != "not glibc"


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_a_cpu_pipeline_stops_each_step_faulting_its_memory_in_again() -> None:
    plain = _faults("plain")
    tuned = _faults("pipeline")
    # 48 MiB is 12,288 pages, faulted in again round after round without the tuning
    assert plain > 10 * 12288
    assert tuned < plain / 3
    # the user's choice wins: MODELSPLIT_MALLOC=system leaves malloc as it is
    assert _faults("pipeline", MODELSPLIT_MALLOC="system") > plain / 2


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="malloc must be one of"):
        Pipeline([nn.Identity()], ["cpu"], chunks=1, malloc="jemalloc")
    with pytest.raises(ValueError, match="malloc must be one of"):
        allocator.keep_freed_memory("always")


def test_system_mode_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_state", {})
    assert allocator.keep_freed_memory("system") is False
    assert allocator._state == {}
    monkeypatch.setenv("MODELSPLIT_MALLOC", "system")
    assert allocator.keep_freed_memory() is False
    assert allocator._state == {}
    monkeypatch.setenv("MODELSPLIT_MALLOC", "off")
    with pytest.raises(ValueError, match="MODELSPLIT_MALLOC must be one of"):
        allocator.keep_freed_memory()


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("MALLOC_ARENA_MAX", "4", "MALLOC_ARENA_MAX"),
        ("MALLOC_TRIM_THRESHOLD_", "0", "MALLOC_TRIM_THRESHOLD_"),
        ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2", "GLIBC_TUNABLES"),
        ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2", "jemalloc"),
    ],
)
@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_the_users_own_allocator_settings_are_left_alone(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, why: str
) -> None:
    monkeypatch.setenv(name, value)
    assert why in allocator._why_not()
    monkeypatch.setattr(allocator, "_state", {})
    assert allocator.keep_freed_memory() is False
    assert why in str(allocator._state["why"])


def test_pipelines_off_the_cpu_do_not_tune(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    monkeypatch.setattr("runtime.pipeline.keep_freed_memory", called.append)
    Pipeline([nn.Identity()], ["meta"], chunks=1)
    assert called == []
    Pipeline([nn.Identity()], ["cpu"], chunks=1, malloc="system")
    assert called == ["system"]
