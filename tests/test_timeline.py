"""The Chrome trace of a pipeline run, recorded with hooks on stage modules."""

from __future__ import annotations

import json
import queue
import threading

import pytest
import torch
from torch import nn

from runtime.timeline import Timeline


def _gpipe(stages: list[nn.Module], x: torch.Tensor, chunks: int) -> torch.Tensor:
    """A tiny stand-in pipeline: one thread per stage, micro-batches in order."""
    queues: list[queue.Queue] = [queue.Queue() for _ in range(len(stages) + 1)]

    def worker(j: int) -> None:
        while (item := queues[j].get()) is not None:
            queues[j + 1].put(stages[j](item))
        queues[j + 1].put(None)

    threads = [
        threading.Thread(target=worker, args=(j,), name=f"worker-{j}") for j in range(len(stages))
    ]
    for t in threads:
        t.start()
    for chunk in x.chunk(chunks):
        queues[0].put(chunk)
    queues[0].put(None)
    outs = []
    while (item := queues[-1].get()) is not None:
        outs.append(item)
    for t in threads:
        t.join()
    return torch.cat(outs)


def test_a_slice_per_micro_batch_and_stage() -> None:
    stages = [nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)]
    timeline = Timeline(stages, ["cpu:0", "cpu:1", "cpu:2"])
    x = torch.randn(12, 8)
    with torch.no_grad(), timeline.recording():
        for _ in range(2):
            with timeline.iteration():
                _gpipe(stages, x, chunks=4)
    assert len(timeline.slices) == 2 * 3 * 4
    assert len(timeline.iterations) == 2
    for j in range(3):
        mine = [s for s in timeline.slices if s.j == j]
        assert [(s.step, s.i) for s in mine] == [(k, i) for k in range(2) for i in range(4)]
        assert {s.thread for s in mine} == {f"worker-{j}"}
    # GPipe order: stage j starts micro-batch i after stage j-1 finished it
    by = {(s.step, s.i, s.j): s for s in timeline.slices}
    for (k, i, j), s in by.items():
        if j:
            assert s.start >= by[(k, i, j - 1)].end
    busy = timeline.busy()
    assert len(busy) == 3 and all(0 < b <= 1 for b in busy)


def test_chrome_trace_format(tmp_path) -> None:
    stages = [nn.Linear(4, 4), nn.Linear(4, 4)]
    timeline = Timeline(stages, ["cpu:0", "cpu:1"])
    with torch.no_grad(), timeline.recording(), timeline.iteration():
        _gpipe(stages, torch.randn(4, 4), chunks=2)
    path = tmp_path / "timeline.json"
    timeline.save(path)
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    names = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {"main", "stage 0 cpu:0", "stage 1 cpu:1"}
    slices = [e for e in events if e["ph"] == "X" and e["cat"] == "forward"]
    assert sorted((e["tid"], e["name"]) for e in slices) == [
        (1, "F0"),
        (1, "F1"),
        (2, "F0"),
        (2, "F1"),
    ]
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in slices)
    assert [e["name"] for e in events if e.get("cat") == "iteration"] == ["iteration 0"]


def test_detach_stops_recording() -> None:
    stage = nn.Linear(2, 2)
    timeline = Timeline([stage])
    with timeline.recording():
        stage(torch.randn(1, 2))
    stage(torch.randn(1, 2))
    assert len(timeline.slices) == 1
    assert not stage._forward_hooks and not stage._forward_pre_hooks


def test_devices_must_match_stages() -> None:
    with pytest.raises(ValueError, match="2 devices for 1 stages"):
        Timeline([nn.Linear(2, 2)], ["cpu:0", "cpu:1"])


def test_the_runtime_can_name_the_micro_batch() -> None:
    stage = nn.Linear(2, 2)
    timeline = Timeline([stage])
    with timeline.recording():
        timeline.note_task(5, 0)
        stage(torch.randn(1, 2))
        stage(torch.randn(1, 2))  # not noted: falls back to the call count
    assert [s.i for s in timeline.slices] == [5, 1]
