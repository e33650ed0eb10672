"""The duty controller and the quiet probe, against modelled plants with an injected clock."""

from __future__ import annotations

from collections import deque

import pytest

from keepgpu.worker.controller import (
    MAX_DT_S,
    MAX_DUTY,
    MIN_DUTY,
    PROBE_EVERY_S,
    PROBE_FIRST_S,
    PROBE_MIN_GAP_S,
    PROBE_S,
    DutyController,
    QuietProbe,
)

TICK = 0.5


class Plant:
    """NVML utilization of a device where our duty reads `gain` times as busy, others add a
    load (percent, union of busy time), and the reading lags `lag` ticks."""

    def __init__(self, gain: float = 1.0, others: float = 0.0, lag: int = 1) -> None:
        self.gain = gain
        self.others = others
        self.history: deque[float] = deque([0.0] * (lag + 1), maxlen=lag + 1)

    def read(self, duty: float) -> float:
        own = min(1.0, self.gain * duty)
        self.history.append(100.0 * (1.0 - (1.0 - own) * (1.0 - self.others / 100.0)))
        return self.history[0]


def run(ctl: DutyController, plant: Plant, seconds: float, t0: float = 0.0) -> list[float]:
    readings = []
    t = t0
    while t < t0 + seconds:
        t += TICK
        util = plant.read(ctl.duty)
        readings.append(util)
        ctl.update(util, t)
    return readings


def test_starts_at_the_feed_forward_duty() -> None:
    assert DutyController(30).duty == pytest.approx(0.30)
    assert DutyController(100).duty == MAX_DUTY
    assert DutyController(0.5).duty == MIN_DUTY


@pytest.mark.parametrize("lag", [1, 2])
@pytest.mark.parametrize(
    ("gain", "target"),
    [(g, t) for g in (0.5, 1.0, 2.0) for t in (10.0, 30.0, 60.0) if t / g <= 100.0],
)
def test_converges_to_the_target_for_any_plant_gain(gain: float, lag: int, target: float
                                                     ) -> None:
    ctl = DutyController(target)
    readings = run(ctl, Plant(gain=gain, lag=lag), 60.0)
    tail = readings[-20:]  # the last 10 s
    assert max(abs(u - target) for u in tail) <= 1.5, tail
    assert ctl.duty == pytest.approx(target / 100.0 / gain, rel=0.08)


def test_converges_with_light_load_of_others() -> None:
    ctl = DutyController(30)
    readings = run(ctl, Plant(others=8.0), 60.0)
    assert abs(readings[-1] - 30.0) <= 1.5
    assert ctl.duty < 0.3  # the others' busy time counts towards the target


def test_duty_stays_in_bounds_and_does_not_wind_up() -> None:
    ctl = DutyController(100)
    plant = Plant(gain=0.5)
    run(ctl, plant, 30.0)
    assert ctl.duty == MAX_DUTY  # saturated: the target cannot be reached
    assert not ctl.reachable(30.0)  # and it says so (status target_reachable)
    ctl.retarget(30)
    readings = run(ctl, plant, 15.0, t0=30.0)
    # anti-windup: no long excursion after saturation, back at the target within 15 s
    assert abs(readings[-1] - 30.0) <= 1.5
    assert ctl.reachable(45.0)
    busy_plant = Plant(others=90.0)
    ctl2 = DutyController(30)
    run(ctl2, busy_plant, 30.0)
    assert ctl2.duty == MIN_DUTY


def test_unknown_utilization_keeps_the_duty() -> None:
    ctl = DutyController(30)
    run(ctl, Plant(gain=2.0), 40.0)
    learned = ctl.duty
    for i in range(20):
        assert ctl.update(None, 40.0 + i * TICK) == learned
    assert ctl.update(float("nan"), 51.0) == learned


def test_deadband_and_step_size() -> None:
    ctl = DutyController(30)
    ctl.update(30.0, 0.0)
    assert ctl.update(30.9, 0.5) == pytest.approx(0.30)  # inside ±1 point: no step
    before = ctl.duty
    ctl.update(20.0, 1.0)  # 10 points low for 0.5 s
    assert ctl.duty == pytest.approx(before + 0.5 * 0.5 * 0.10)


def test_a_long_gap_steps_at_most_max_dt() -> None:
    ctl = DutyController(30)
    ctl.update(30.0, 0.0)
    ctl.update(0.0, 100.0)  # 100 s later: capped
    assert ctl.duty == pytest.approx(0.30 + 0.5 * MAX_DT_S * 0.30)


def test_hold_skips_the_held_time() -> None:
    ctl = DutyController(30)
    ctl.update(30.0, 0.0)
    ctl.hold(10.0)
    ctl.update(0.0, 10.5)
    assert ctl.duty == pytest.approx(0.30 + 0.5 * 0.5 * 0.30)


def test_retarget_keeps_the_learned_gain() -> None:
    ctl = DutyController(30)
    run(ctl, Plant(gain=2.0), 60.0)
    assert ctl.duty == pytest.approx(0.15, rel=0.08)
    ctl.retarget(60)
    assert ctl.duty == pytest.approx(0.30, rel=0.08)  # no transient: already right
    ctl.retarget(60)
    assert ctl.duty == pytest.approx(0.30, rel=0.08)


# --- quiet probe ------------------------------------------------------------------------------


def test_probe_on_suspicion_measures_the_others() -> None:
    probe = QuietProbe(now=0.0)
    # our duty explains 30 %, the device reads 95 %: suspicious at once
    assert probe.update(95.0, 0.30, 10.0, None, 5.0, now=0.5) is True
    assert probe.active
    assert probe.update(95.0, 0.0, 10.0, 0.5, None, now=1.0) is True  # still quiet
    assert probe.update(85.0, 0.0, 10.0, 1.0, None, now=0.5 + PROBE_S) is False
    assert probe.others_pct == 85.0
    # suspicion again right away: not before PROBE_MIN_GAP_S
    assert probe.update(95.0, 0.30, 10.0, None, 0.5, now=2.0) is False
    t = 0.5 + PROBE_S + PROBE_MIN_GAP_S
    assert probe.update(95.0, 0.30, 10.0, None, 5.0, now=t) is True


def test_probe_runs_periodically_without_suspicion() -> None:
    probe = QuietProbe(now=0.0)
    starts: list[float] = []
    t, was_quiet = 0.0, False
    while t < 100.0:
        t += TICK
        util = 0.0 if was_quiet else 30.0  # our 30 % and nobody else's
        quiet = probe.update(util, 0.0 if was_quiet else 0.30, 10.0, None, 5.0, now=t)
        if quiet and not was_quiet:
            starts.append(t)
        was_quiet = quiet
    first = [s for s in starts if s < PROBE_FIRST_S + TICK]
    assert first, starts
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps and all(PROBE_EVERY_S <= g <= PROBE_EVERY_S + PROBE_S + 2 * TICK for g in gaps)


def test_probe_is_off_when_busy_backoff_is_disabled() -> None:
    probe = QuietProbe(now=0.0)
    for i in range(400):
        assert probe.update(99.0, 0.30, -1.0, None, 5.0, now=i * TICK) is False


def test_backoff_counts_as_a_probe() -> None:
    probe = QuietProbe(now=0.0)
    assert probe.update(40.0, 0.0, 10.0, PROBE_S, None, now=3.0) is False
    assert probe.others_pct == 40.0
    assert probe.next_at >= 3.0 + PROBE_EVERY_S


def test_probe_learns_the_plant_gain() -> None:
    """NVML reads our pulses twice as long as they are: after a probe that found the others
    idle, 30 % of reading at 15 % duty is no longer suspicious."""
    probe = QuietProbe(now=0.0)
    assert probe.update(30.0, 0.15, 10.0, None, 5.0, now=0.5) is True  # 30 - 15 > 10
    assert probe.update(0.0, 0.0, 10.0, PROBE_S, None, now=0.5 + PROBE_S) is False
    assert probe.others_pct == 0.0
    t = 0.5 + PROBE_S
    for i in range(1, 40):
        assert probe.update(30.0, 0.15, 10.0, None, i * TICK, now=t + i * TICK) is False, i
        if t + i * TICK >= 0.5 + PROBE_S + PROBE_MIN_GAP_S:
            break
    assert probe.gain == pytest.approx(1.5)  # halfway from 1 to the observed 2
