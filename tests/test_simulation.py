"""The event simulation of training schedules (partitioner.planner.simulation): closed forms,
memory, errors, and properties of any schedule."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from partitioner.planner.schedules import SCHEDULES, Action, actions
from partitioner.planner.simulation import Simulation, simulate

F, B = 1.0, 2.0


def uniform(
    schedule: str, k: int, m: int, v: int = 1, f: float = F, b: float = B, **kw: Any
) -> Simulation:
    """K devices x V virtual stages sharing a forward f and backward b per micro-batch."""
    s = k * v
    return simulate([f / v] * s, [b / v] * s, schedule, m, virtual_stages=v, **kw)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("k", "m"), [(1, 1), (1, 5), (2, 2), (2, 7), (3, 3), (4, 8), (5, 16)])
@pytest.mark.parametrize(("f", "b"), [(1.0, 2.0), (0.5, 1.5)])
def test_gpipe_and_1f1b_closed_form(schedule: str, k: int, m: int, f: float, b: float) -> None:
    sim = uniform(schedule, k, m, f=f, b=b)
    assert sim.step_time == pytest.approx((m + k - 1) * (f + b))
    assert sim.busy == pytest.approx([m * (f + b)] * k)
    assert sim.bubble == pytest.approx((k - 1) / (m + k - 1))


@pytest.mark.parametrize(
    ("k", "m", "v"),
    [
        (1, 3, 2),
        (2, 2, 2),
        (2, 4, 2),
        (3, 6, 3),
        (4, 4, 2),
        (4, 8, 2),
        (4, 8, 4),
        (4, 5, 2),
        (4, 12, 3),
        (3, 9, 2),
        (4, 8, 1),
    ],
)
def test_interleaving_divides_the_bubble_by_v(k: int, m: int, v: int) -> None:
    """Stage costs F / V and B / V: step M (F + B) + (K - 1)(F + B) / V once M >= K."""
    sim = uniform("interleaved-1f1b", k, m, v)
    assert sim.step_time == pytest.approx(m * (F + B) + (k - 1) * (F + B) / v)
    flat = uniform("1f1b", k, m)
    assert sim.step_time - m * (F + B) == pytest.approx((flat.step_time - m * (F + B)) / v)


def test_interleaving_with_fewer_micro_batches_than_devices_waits() -> None:
    """With M < K a round is shorter than the pipeline: the closed form is a lower bound."""
    sim = uniform("interleaved-1f1b", 4, 2, 2)
    assert sim.step_time > 2 * (F + B) + 3 * (F + B) / 2


@pytest.mark.parametrize(("k", "m"), [(2, 2), (2, 3), (3, 3), (3, 5), (4, 8), (5, 10)])
def test_zero_bubble_closed_form(k: int, m: int) -> None:
    """ZB-H1 with forward = input-grad = weight-grad = t: the bubble is (K - 1) t, a third
    of 1F1B's (K - 1) 3t."""
    t = 0.5
    sim = simulate([t] * k, [2 * t] * k, "zero-bubble", m)  # weight_grad: half of backward
    assert sim.step_time == pytest.approx(3 * m * t + (k - 1) * t)
    assert uniform("1f1b", k, m, f=t, b=2 * t).step_time == pytest.approx(3 * (m + k - 1) * t)


@pytest.mark.parametrize(("k", "m", "v"), [(2, 4, 1), (3, 6, 1), (4, 8, 1), (4, 8, 2)])
@pytest.mark.parametrize("w", [0.0, 0.25, 0.5, 1.0, 1.5])
def test_zero_bubble_is_never_slower_than_1f1b(k: int, m: int, v: int, w: float) -> None:
    one_f_one_b = uniform("interleaved-1f1b" if v > 1 else "1f1b", k, m, v)
    zb = uniform("zero-bubble", k, m, v, weight_grad=[w / v] * (k * v))
    assert zb.step_time <= one_f_one_b.step_time + 1e-9
    assert zb.busy == pytest.approx(one_f_one_b.busy)  # the same work, reordered


def test_weight_grad_is_ignored_without_w_actions() -> None:
    assert uniform("1f1b", 3, 3, weight_grad=[0.5] * 3) == uniform("1f1b", 3, 3)


@pytest.mark.parametrize(("k", "m", "t"), [(2, 3, 0.25), (4, 8, 0.5), (3, 3, 2.0)])
def test_gpipe_with_transfers(k: int, m: int, t: float) -> None:
    """Each boundary costs t forward and t backward on the critical path."""
    sim = uniform("gpipe", k, m, send=[t] * (k - 1))
    assert sim.step_time == pytest.approx((m + k - 1) * (F + B) + 2 * (k - 1) * t)
    assert sim.busy == pytest.approx([m * (F + B)] * k)  # transfers occupy no device


def test_transfers_between_stages_of_one_device_are_free() -> None:
    one = simulate([F] * 3, [B] * 3, "interleaved-1f1b", 2, virtual_stages=3, send=[9.0] * 2)
    assert one.step_time == pytest.approx(2 * 3 * (F + B))


@pytest.mark.parametrize(("k", "m"), [(2, 4), (4, 4), (4, 8), (3, 9)])
def test_1f1b_holds_at_most_k_micro_batches_gpipe_all(k: int, m: int) -> None:
    acts, params = [1] * k, [100] * k
    gpipe = uniform("gpipe", k, m, act_bytes=acts, param_bytes=params)
    one_f_one_b = uniform("1f1b", k, m, act_bytes=acts, param_bytes=params)
    zb = uniform("zero-bubble", k, m, act_bytes=acts, param_bytes=params)
    assert gpipe.peak_bytes == tuple([100 + m] * k)
    assert one_f_one_b.peak_bytes == tuple(100 + k - d for d in range(k))
    if m > k:
        assert one_f_one_b.peak_bytes[0] < gpipe.peak_bytes[0]
    assert max(zb.peak_bytes) <= 100 + k  # W frees a micro-batch, and ZB-H1 keeps K alive


@pytest.mark.parametrize(("k", "m", "v"), [(2, 4, 2), (3, 6, 2), (4, 8, 2), (4, 4, 2), (3, 9, 3)])
def test_interleaved_in_flight(k: int, m: int, v: int) -> None:
    """Device d holds its warm-up plus one: (V - 1) per_round + 2 (K - 1 - d) + 1, at most M V."""
    sim = uniform("interleaved-1f1b", k, m, v, act_bytes=[1] * (k * v))
    per_round = m // max(1, m // k)
    assert sim.peak_bytes == tuple(
        min(m * v, (v - 1) * per_round + 2 * (k - 1 - d) + 1) for d in range(k)
    )


def test_peak_bytes_count_each_stage_of_a_device() -> None:
    sim = uniform(
        "interleaved-1f1b", 2, 2, 2, act_bytes=[1, 10, 100, 1000], param_bytes=[1, 2, 3, 4]
    )
    assert len(sim.peak_bytes) == 2
    assert sim.peak_bytes[0] == 1 + 3 + max(_alive(sim, 0, [1, 10, 100, 1000]))
    assert sim.peak_bytes[1] == 2 + 4 + max(_alive(sim, 1, [1, 10, 100, 1000]))


def _alive(sim: Simulation, d: int, acts: list[int]) -> list[int]:
    """Activation bytes on device d after each of its actions, from the events."""
    alive, out = 0, []
    for e in sim.events:
        if e.device == d:
            alive += {"F": acts[e.action.stage], "B": -acts[e.action.stage]}.get(e.action.kind, 0)
            out.append(alive)
    return out


def test_a_schedule_given_as_lists() -> None:
    """Any layout of stages on devices: here a V, stages 0 and 3 on device 0."""
    order = [
        [Action(0, "F", 0), Action(3, "F", 0), Action(3, "B", 0), Action(0, "B", 0)],
        [Action(1, "F", 0), Action(2, "F", 0), Action(2, "B", 0), Action(1, "B", 0)],
    ]
    sim = simulate([1.0] * 4, [2.0] * 4, order, 1, send=[0.5, 0.5, 0.5])
    assert sim.step_time == pytest.approx(4 * 3.0 + 4 * 0.5)  # boundary 1-2 is on one device
    assert [str(e.action) for e in sim.events] == [
        "0F0",
        "1F0",
        "2F0",
        "3F0",
        "3B0",
        "2B0",
        "1B0",
        "0B0",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"forward": [1.0] * 3}, "3 stage costs for some devices x 2 virtual stages"),
        ({"backward": [1.0]}, "backward needs 4 values"),
        ({"forward": [1.0, -1.0, 1.0, 1.0]}, r"forward needs finite seconds >= 0 \(got -1.0\)"),
        ({"send": [1.0]}, "send needs 3 values"),
        ({"act_bytes": [1, 2]}, r"act_bytes needs 4 values >= 0.*\[1, 2\]"),
        ({"param_bytes": [1, 2, 3, -4]}, "param_bytes needs 4 values >= 0"),
        (
            {"schedule": "zero-bubble", "weight_grad": [0.5, 3.0, 0.5, 0.5]},
            r"stage 1 has weight_grad 3.0 > backward 2.0",
        ),
        ({"num_devices": 4}, "4 devices x 2 virtual stages"),
    ],
)
def test_simulate_rejects_bad_input(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "forward": [1.0] * 4,
        "backward": [2.0] * 4,
        "schedule": "interleaved-1f1b",
        "chunks": 2,
        "virtual_stages": 2,
    }
    with pytest.raises(ValueError, match=match):
        simulate(**{**args, **kwargs})


def test_simulate_rejects_an_incomplete_or_stuck_schedule() -> None:
    with pytest.raises(ValueError, match=r"missing \['0B1'\]"):
        simulate([1.0], [1.0], [[Action(0, "F", 0), Action(0, "F", 1), Action(0, "B", 0)]], 2)
    with pytest.raises(ValueError, match="deadlocks"):
        simulate([1.0], [1.0], [[Action(0, "B", 0), Action(0, "F", 0)]], 1)
    with pytest.raises(ValueError, match="the schedule has 1 devices, not 2"):
        simulate([1.0], [1.0], [[Action(0, "F", 0), Action(0, "B", 0)]], 1, num_devices=2)


def test_simulate_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from partitioner.planner.simulation import simulate\n"
        "assert simulate([1.0], [2.0], 'gpipe', 2).step_time == 6.0\n"
        "assert 'torch' not in sys.modules, 'the simulation imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# Any schedule, any costs: what an event simulation must satisfy.

_secs = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.0])


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    schedule = draw(st.sampled_from(SCHEDULES))
    k = draw(st.integers(1, 4))
    v = 1 if schedule in ("gpipe", "1f1b") else draw(st.integers(1, 3))
    m = draw(st.integers(k if schedule == "1f1b" else 1, 8))
    if schedule in ("interleaved-1f1b", "zero-bubble"):
        m -= m % max(1, m // k)  # torch's rounds: m a multiple of max(1, m // k)
    s = k * v
    backward = draw(st.lists(_secs, min_size=s, max_size=s))
    return {
        "forward": draw(st.lists(_secs, min_size=s, max_size=s)),
        "backward": backward,
        "schedule": schedule,
        "chunks": m,
        "virtual_stages": v,
        "send": draw(
            st.lists(st.sampled_from([0.0, 0.0, 0.5, 1.5]), min_size=s - 1, max_size=s - 1)
        ),
        "weight_grad": [b * draw(st.sampled_from([0.0, 0.5, 1.0])) for b in backward],
        "act_bytes": draw(st.lists(st.integers(0, 9), min_size=s, max_size=s)),
    }


@given(cases())
def test_simulation_properties(case: dict[str, Any]) -> None:
    sim = simulate(**case)
    k = len(case["forward"]) // case["virtual_stages"]
    order = actions(case["schedule"], k, case["chunks"], case["virtual_stages"])
    # every action runs exactly once, on its device, in its device's order, never overlapping
    assert sorted(map(str, (e.action for e in sim.events))) == sorted(
        str(a) for ops in order for a in ops
    )
    for d, ops in enumerate(order):
        ran = {e.action: e for e in sim.events if e.device == d}
        assert set(ran) == set(ops)
        for before, after in zip(ops, ops[1:], strict=False):
            assert ran[after].start >= ran[before].end - 1e-9
    # no faster than the busiest device, nor than one micro-batch's round trip
    assert sim.step_time >= max(sim.busy) - 1e-9
    assert sim.step_time >= _critical_path(case) - 1e-9
    assert sim.busy == pytest.approx([sum(_ops_time(case, ops)) for ops in order])
    assert all(p >= 0 for p in sim.peak_bytes)


def _ops_time(case: dict[str, Any], ops: list[Action]) -> list[float]:
    split = case["schedule"] == "zero-bubble"
    out = []
    for a in ops:
        w = case["weight_grad"][a.stage] if split else 0.0
        out.append(
            {"F": case["forward"][a.stage], "B": case["backward"][a.stage] - w, "W": w}[a.kind]
        )
    return out


def _critical_path(case: dict[str, Any]) -> float:
    """One micro-batch forward through every stage and back (then stage 0's weight-grad),
    paying each boundary between two devices both ways."""
    k = len(case["forward"]) // case["virtual_stages"]
    split = case["schedule"] == "zero-bubble"
    grads = [
        b - (w if split else 0.0)
        for b, w in zip(case["backward"], case["weight_grad"], strict=True)
    ]
    hops = sum(t for j, t in enumerate(case["send"]) if j % k != (j + 1) % k)
    return sum(case["forward"]) + sum(grads) + 2 * hops + (case["weight_grad"][0] if split else 0)
