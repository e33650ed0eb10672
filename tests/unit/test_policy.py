"""Politeness rules and the Governor against every fake telemetry scenario, injected clock."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection

import pytest

from keepgpu.protocol.units import VramRequest
from keepgpu.telemetry.base import GpuProcess, GpuSample
from keepgpu.telemetry.fake import FakeTelemetry, fake_device_uuid
from keepgpu.worker.controller import PROBE_EVERY_S
from keepgpu.worker.engines.base import CHUNK_BYTES
from keepgpu.worker.governor import Decision, DeviceLost, Governor
from keepgpu.worker.policy import (
    BUSY_CLEAR_S,
    RESERVE_MIN_BYTES,
    PressureRule,
    ThermalRule,
    attributed_others,
    reserve_bytes,
)
from keepgpu.worker.run import pulse_schedule
from keepgpu.worker.settings import Settings

GiB = 1024**3
MiB = 1024**2
TICK = 0.5
ME = os.getpid()
UID = os.getuid()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Rewrite = Callable[[GpuSample, float], GpuSample]


class Sim:
    """The keep loop reduced to its control ticks: the fake GPU sees the duty and hold that
    the previous decision asked for."""

    def __init__(self, scenario: str, rewrite: Rewrite | None = None, **settings: object
                 ) -> None:
        self.clock = Clock()
        self.settings = Settings(**{"vram": VramRequest(bytes=4 * GiB), **settings})  # type: ignore[arg-type]
        self.duty = 0.0
        self.held = self.target
        self.telemetry = FakeTelemetry(scenario, uuid=fake_device_uuid("0"), clock=self.clock,
                                       own_duty=lambda: self.duty, own_held=lambda: self.held)
        self.rewrite = rewrite
        self.governor = Governor(self.settings, self.clock.now, own_pids=(ME,), uid=UID)
        self.log: list[tuple[float, Decision]] = []

    @property
    def target(self) -> int:
        return self.settings.vram.resolve(80 * GiB)

    @property
    def t(self) -> float:
        return self.clock.now - 1000.0

    def step(self) -> Decision:
        self.clock.now += TICK
        sample = self.telemetry.sample([ME])
        if self.rewrite is not None:
            sample = self.rewrite(sample, self.t)
        d = self.governor.decide(sample, self.clock.now, self.held, self.target, self.duty)
        self.held = self.target if d.hold_bytes is None else min(self.target, d.hold_bytes)
        # what the keep loop really pulses for this decision (pstate: its fixed schedule)
        plan = pulse_schedule(self.settings.mode, d.duty)
        self.duty = 0.0 if plan is None else plan[0] / plan[1]
        self.log.append((self.t, d))
        return d

    def run(self, seconds: float) -> list[Decision]:
        end = self.t + seconds
        out = []
        while self.t < end - 1e-9:
            out.append(self.step())
        return out

    def first(self, pred: Callable[[Decision], bool]) -> float | None:
        return next((t for t, d in self.log if pred(d)), None)

    def transitions(self) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        for _, d in self.log:
            if not out or out[-1] != (d.state, d.reason):
                out.append((d.state, d.reason))
        return out


def backoff(reason: str) -> Callable[[Decision], bool]:
    return lambda d: (d.state, d.reason) == ("backoff", reason)


# --- idle and the controller in the loop --------------------------------------------------------


def test_idle_holds_at_the_target_utilization() -> None:
    sim = Sim("idle")
    sim.run(30)
    assert sim.transitions() == [("holding", None)]
    assert sim.duty == pytest.approx(0.30, abs=0.02)
    assert sim.held == 4 * GiB
    assert sim.log[-1][1].others_util_pct == 0.0


def test_the_keepers_own_load_never_counts_as_busy() -> None:
    sim = Sim("idle:after=0", target_util=100.0, busy_threshold=5.0)
    sim.run(30)
    assert sim.transitions() == [("holding", None)]
    assert sim.duty == 1.0


def test_the_duty_follows_the_device_not_the_wall_clock() -> None:
    """NVML reads our pulses twice as long (gain 2): the duty settles at half the target."""
    sim = Sim("idle:after=0,gain=2")
    sim.run(30)
    assert sim.duty == pytest.approx(0.15, abs=0.015)
    sample = sim.telemetry.sample([ME])
    assert sample.util_pct == pytest.approx(30.0, abs=3.0)


def test_target_change_takes_effect_live() -> None:
    sim = Sim("idle")
    sim.run(20)
    sim.settings.target_util = 60.0
    sim.run(20)
    assert sim.duty == pytest.approx(0.60, abs=0.02)


# --- busy ----------------------------------------------------------------------------------


def test_busy_backs_off_and_comes_back() -> None:
    sim = Sim("busy:after=3,for=5")
    sim.run(15)
    assert sim.transitions() == [("holding", None), ("backoff", "busy"), ("holding", None)]
    start = sim.first(backoff("busy"))
    assert start is not None and 3.0 <= start <= 3.0 + 2 * TICK
    end = max(t for t, d in sim.log if d.reason == "busy")
    assert 8.0 + BUSY_CLEAR_S - TICK <= end <= 8.0 + BUSY_CLEAR_S + TICK
    for t, d in sim.log:
        if d.reason == "busy":
            assert d.duty == 0.0 and d.hold_bytes is None  # no pulses, memory kept
        if 3.0 <= t < 8.0:
            assert d.others_util_pct == pytest.approx(85.0)  # theirs alone, not ours


def test_busy_threshold_minus_one_disables_backoff() -> None:
    sim = Sim("busy:after=1", busy_threshold=-1.0)
    sim.run(10)
    assert sim.transitions() == [("holding", None)]
    assert sim.duty > 0


def test_busy_threshold_change_takes_effect_live() -> None:
    sim = Sim("busy:after=1,util=50")
    sim.run(4)
    assert sim.log[-1][1].reason == "busy"
    sim.settings.busy_threshold = 60.0
    sim.run(BUSY_CLEAR_S + 1)
    assert sim.log[-1][1].state == "holding"


def test_busy_without_per_process_utilization_uses_a_quiet_probe() -> None:
    sim = Sim("busy:after=3,for=6,perproc=0")
    sim.run(16)
    assert sim.transitions()[-1] == ("holding", None)
    assert ("backoff", "busy") in sim.transitions()
    start = sim.first(backoff("busy"))
    assert start is not None and start <= 3.0 + 2.5  # suspicion -> probe -> busy
    assert any(d.probing for _, d in sim.log)


def test_without_per_process_data_probes_are_rare_and_cheap() -> None:
    """Where NVML reads our pulses as twice their length, the learned gain keeps suspicion
    quiet: probes come about every PROBE_EVERY_S and the keeper never calls itself busy."""
    sim = Sim("idle:after=0,gain=2,perproc=0")
    sim.run(120)
    assert ("backoff", "busy") not in sim.transitions()
    quiet = sum(1 for _, d in sim.log if d.probing)
    assert quiet * TICK <= 120 / PROBE_EVERY_S * 2.0 + 4.0
    assert sim.duty == pytest.approx(0.15, abs=0.03)


def test_in_a_pid_namespace_own_load_is_not_taken_for_others() -> None:
    """NVML lists host PIDs: our own process shows under another PID. The per-process data
    cannot be attributed, so the keeper falls back to probes and does not flap."""

    def host_pids(s: GpuSample, t: float) -> GpuSample:
        procs = tuple(dataclasses.replace(p, pid=p.pid + 10**6) for p in s.processes or ())
        return dataclasses.replace(s, processes=procs, own_util_pct=0.0,
                                   extra={**s.extra, "own_pid_visible": False})

    sim = Sim("idle", rewrite=host_pids)
    sim.run(60)
    assert sim.transitions() == [("holding", None)]
    assert sim.duty == pytest.approx(0.30, abs=0.03)


# --- thermal -------------------------------------------------------------------------------


def test_hot_backs_off_and_resumes() -> None:
    sim = Sim("hot:after=2,for=3")
    sim.run(10)
    assert sim.transitions() == [("holding", None), ("backoff", "thermal"), ("holding", None)]
    assert all(d.duty == 0 for _, d in sim.log if d.reason == "thermal")


def test_thermal_hysteresis_is_five_degrees() -> None:
    rule = ThermalRule()
    assert rule.update(83.0, 83.0) is False  # at the limit: fine
    assert rule.update(84.0, 83.0) is True
    assert rule.update(80.0, 83.0) is True  # not yet 5 below
    assert rule.update(None, 83.0) is True  # unknown: keep the judgement
    assert rule.update(78.0, 83.0) is False
    assert rule.update(82.0, 83.0) is False


def test_max_temp_change_takes_effect_live() -> None:
    sim = Sim("hot:after=1,temp=88")
    sim.run(3)
    assert sim.log[-1][1].reason == "thermal"
    sim.settings.max_temp = 90.0
    sim.run(1)
    assert sim.log[-1][1].reason == "thermal"  # 88 is not 5 below the new limit
    sim.settings.max_temp = 95.0
    sim.run(1)
    assert sim.log[-1][1].state == "holding"


# --- pressure ------------------------------------------------------------------------------


def test_pressure_from_our_own_user_yields_and_regrows() -> None:
    sim = Sim("pressure:after=2,for=3")
    held: list[int] = []
    for _ in range(int(20 / TICK)):
        sim.step()
        held.append(sim.held)
    assert min(held) == 0  # a greedy process of ours took everything we gave
    low = held.index(0)
    assert all(h == 4 * GiB for h in held[: int(2 / TICK) - 1])
    regrow = held[low:]
    assert regrow == sorted(regrow)  # no oscillation: only up once it starts
    steps = {b - a for a, b in zip(regrow, regrow[1:], strict=False)} - {0}
    assert steps == {CHUNK_BYTES}  # one chunk per tick
    assert held[-1] == 4 * GiB
    assert sim.transitions() == [("holding", None), ("backoff", "pressure"), ("holding", None)]
    assert all(d.duty > 0 for _, d in sim.log)  # pulses go on: pressure is about memory


def test_foreign_pressure_keeps_the_hold() -> None:
    sim = Sim("foreign-pressure:after=2,for=3")
    sim.run(10)
    assert {d.hold_bytes for _, d in sim.log} == {None}
    assert sim.held == 4 * GiB
    assert sim.transitions() == [("holding", None), ("holding", "pressure-held"),
                                 ("holding", None)]


def test_on_pressure_hold_keeps_the_hold_against_our_own_user() -> None:
    sim = Sim("pressure:after=1", on_pressure="hold")
    sim.run(5)
    assert sim.held == 4 * GiB
    assert sim.log[-1][1].reason == "pressure-held"
    sim.settings.on_pressure = "yield"  # live change
    sim.run(2)
    assert sim.held == 0 and sim.log[-1][1].reason == "pressure"


def test_reserve_is_at_least_512_mib_or_two_percent() -> None:
    assert reserve_bytes(8 * GiB) == RESERVE_MIN_BYTES
    assert reserve_bytes(80 * GiB) == int(80 * GiB * 0.02)


def _mem_sample(free: int, procs: tuple[GpuProcess, ...] | None) -> GpuSample:
    total = 80 * GiB
    return GpuSample(mem_used_bytes=total - free, mem_total_bytes=total, processes=procs)


def test_pressure_attribution() -> None:
    me = GpuProcess(ME, used_bytes=70 * GiB, uid=UID)
    rule = PressureRule(UID)
    # only we hold memory: our own --vram, not pressure
    assert rule.update(_mem_sample(100 * MiB, (me,)), {ME}, 70 * GiB, 70 * GiB, "yield",
                       0.0).status is None
    # unknown owner (uid None) and unknown process list: held, not yielded
    stranger = GpuProcess(7, used_bytes=GiB, uid=None)
    assert rule.update(_mem_sample(100 * MiB, (me, stranger)), {ME}, 70 * GiB, 70 * GiB,
                       "yield", 0.0).status == "held"
    assert rule.update(_mem_sample(100 * MiB, None), {ME}, 70 * GiB, 70 * GiB, "yield",
                       0.0).status == "held"
    # ours: the deficit goes back at once, in whole chunks
    mine = GpuProcess(8, used_bytes=GiB, uid=UID)
    view = rule.update(_mem_sample(100 * MiB, (me, mine)), {ME}, 70 * GiB, 70 * GiB, "yield",
                       0.0)
    deficit = reserve_bytes(80 * GiB) - 100 * MiB
    chunks = -(-deficit // CHUNK_BYTES)
    assert view.status == "yielded" and view.cap_bytes == 70 * GiB - chunks * CHUNK_BYTES
    # free just above the reserve: no regrowth yet (needs reserve + one chunk)
    cap = view.cap_bytes
    just = reserve_bytes(80 * GiB) + CHUNK_BYTES // 2
    assert rule.update(_mem_sample(just, (me, mine)), {ME}, cap, 70 * GiB, "yield",
                       100.0).cap_bytes == cap
    # --vram lowered under the cap: the cap goes away
    assert rule.update(_mem_sample(just, (me, mine)), {ME}, cap, GiB, "yield",
                       101.0).cap_bytes is None


# --- missing telemetry, errors, lost -------------------------------------------------------


def test_no_util_keeps_the_duty_and_says_so() -> None:
    sim = Sim("no-util")
    sim.run(10)
    assert sim.transitions() == [("holding", "no-telemetry")]
    assert all(d.duty == pytest.approx(0.30) for _, d in sim.log)


def test_no_util_after_learning_keeps_the_learned_duty() -> None:
    sim = Sim("no-util:after=30,gain=2")
    sim.run(30)
    learned = sim.duty
    assert learned == pytest.approx(0.15, abs=0.015)
    sim.run(10)
    assert sim.log[-1][1].reason == "no-telemetry"
    assert sim.duty == pytest.approx(learned)


def test_flaky_nvml_does_not_flap() -> None:
    """Every third reading fails: no no-telemetry flapping, no busy, the duty stays put."""
    sim = Sim("flaky")
    sim.run(30)
    assert sim.transitions() == [("holding", None)]
    assert sim.duty == pytest.approx(0.30, abs=0.02)


def test_nvml_failing_every_time_is_no_telemetry() -> None:
    sim = Sim("flaky:every=1")
    sim.run(5)
    assert sim.transitions() == [("holding", "no-telemetry")]
    assert sim.duty > 0


def test_nvml_errors_mid_run_then_recovery() -> None:
    def broken(s: GpuSample, t: float) -> GpuSample:
        if 10 <= t < 15:  # every call fails for 5 s; memory still reads
            return GpuSample(uuid=s.uuid, mem_used_bytes=s.mem_used_bytes,
                             mem_total_bytes=s.mem_total_bytes,
                             error="nvmlDeviceGetUtilizationRates: Unknown Error")
        return s

    sim = Sim("idle", rewrite=broken)
    sim.run(25)
    assert sim.transitions() == [("holding", None), ("holding", "no-telemetry"),
                                 ("holding", None)]
    blind = [d for t, d in sim.log if 11.5 <= t < 15]
    assert blind and all(d.reason == "no-telemetry" and d.duty > 0.25 for d in blind)


def test_lost_gpu_raises() -> None:
    sim = Sim("lost:after=3")
    sim.run(2.5)
    with pytest.raises(DeviceLost, match="lost"):
        sim.run(2)


def test_lost_gpu_at_start_raises() -> None:
    sim = Sim("lost:after=0")
    with pytest.raises(DeviceLost):
        sim.step()


# --- pause ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["duty", "sm", "compute", "pstate"])
def test_every_mode_stops_pulsing_in_backoff(mode: str) -> None:
    sim = Sim("hot:after=3,for=3", mode=mode)
    sim.run(1)
    assert sim.duty > 0
    sim.governor.pause(None, sim.clock.now)
    sim.step()
    assert sim.duty == 0.0  # paused: not a single pulse, pstate included
    sim.governor.resume()
    sim.run(3)
    thermal = [d for _, d in sim.log if d.reason == "thermal"]
    assert thermal and sim.duty == 0.0  # too hot: no pulses either
    sim.run(6)
    assert sim.log[-1][1].reason is None and sim.duty > 0


def test_pulse_schedule_is_none_at_zero_duty_in_every_mode() -> None:
    for mode in ("duty", "sm", "compute", "pstate"):
        assert pulse_schedule(mode, 0.0) is None
    assert pulse_schedule("pstate", 1.0) is not None


def test_an_unreachable_target_is_reported() -> None:
    # pulses come out at a fifth of what is asked (a stale spin calibration): util <= 20 %
    sim = Sim("idle", target_util=60.0,
              rewrite=lambda s, t: dataclasses.replace(s, util_pct=(s.util_pct or 0) / 5))
    sim.run(3)
    assert sim.log[-1][1].target_reachable is True
    sim.run(20)
    d = sim.log[-1][1]
    assert d.duty == 1.0 and d.target_reachable is False
    sim.settings.target_util = 10.0
    sim.run(20)
    assert sim.log[-1][1].target_reachable is True
    sim.governor.pause(None, sim.clock.now)
    assert sim.step().target_reachable is None  # not steering: not judged


def test_pause_and_resume() -> None:
    sim = Sim("idle")
    sim.run(3)
    sim.governor.pause(None, sim.clock.now)
    d = sim.step()
    assert (d.state, d.reason, d.duty, d.hold_bytes) == ("backoff", "paused", 0.0, None)
    sim.run(5)
    assert sim.log[-1][1].reason == "paused"
    sim.governor.resume()
    assert sim.step().state == "holding"


def test_pause_for_seconds_ends_by_itself() -> None:
    sim = Sim("idle")
    sim.governor.pause(2.0, sim.clock.now)
    sim.run(4)
    assert sim.transitions() == [("backoff", "paused"), ("holding", None)]


def test_pause_from_settings_survives_a_restart() -> None:
    sim = Sim("idle", paused_forever=True)
    sim.run(3)
    assert sim.transitions() == [("backoff", "paused")]


def test_paused_wins_over_busy_and_hot() -> None:
    sim = Sim("busy:after=0")
    sim.governor.pause(None, sim.clock.now)
    sim.run(3)
    assert {d.reason for _, d in sim.log} == {"paused"}


# --- attribution ---------------------------------------------------------------------------


def _util_sample(util: float | None, own: float | None,
                 procs: Collection[GpuProcess] | None) -> GpuSample:
    return GpuSample(util_pct=util, own_util_pct=own,
                     processes=None if procs is None else tuple(procs))


def test_attribution_of_the_others_load() -> None:
    me = GpuProcess(ME, util_pct=30.0)
    other = GpuProcess(9, util_pct=20.0)
    assert attributed_others(_util_sample(50.0, 30.0, [me, other]), {ME}) == 20.0
    assert attributed_others(_util_sample(50.0, 30.0, None), {ME}) == 20.0
    assert attributed_others(_util_sample(50.0, None, None), {ME}) is None
    unknown = GpuProcess(9, util_pct=None)
    assert attributed_others(_util_sample(50.0, 30.0, [me, unknown]), {ME}) is None
