"""Fake telemetry: every scenario, event timing by an injected clock, spec parsing."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest

from keepgpu.telemetry.base import GpuSample
from keepgpu.telemetry.fake import (
    BASELINE_BYTES,
    FAKE_PID_BASE,
    PRESSURE_AFTER_BYTES,
    FakeTelemetry,
    fake_device_uuid,
    parse_scenario,
)

GiB = 1024**3
MiB = 1024**2
UUID = fake_device_uuid("0")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Keeper:
    """The keeper's own state as the fake engine would expose it."""

    def __init__(self, duty: float = 0.0, held: int = 0) -> None:
        self.duty = duty
        self.held = held


def make(scenario: str, clock: Clock, keeper: Keeper, **kwargs: Any) -> FakeTelemetry:
    return FakeTelemetry(scenario, uuid=UUID, clock=clock, own_duty=lambda: keeper.duty,
                         own_held=lambda: keeper.held, own_pid=4242, **kwargs)


def others(s: GpuSample) -> list[Any]:
    assert s.processes is not None
    return [p for p in s.processes if p.pid != 4242]


# --- parsing -----------------------------------------------------------------------------------


def test_parse_defaults_and_keys() -> None:
    idle = parse_scenario("idle")
    assert (idle.name, idle.after_s, idle.for_s) == ("idle", 1.0, math.inf)
    busy = parse_scenario(" busy : after=2.5, for=3 ,util=60,gain=2,mem=2GiB ")
    assert busy.name == "busy"
    assert (busy.after_s, busy.for_s) == (2.5, 3.0)
    assert busy.params["util"] == 60.0 and busy.params["gain"] == 2.0
    assert busy.params["mem"] == 2 * GiB
    assert parse_scenario("pressure:free=64MiB").params["free"] == 64 * MiB
    assert parse_scenario("pressure:free=0").params["free"] == 0
    assert parse_scenario("no-util").after_s == 0.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "unknown fake telemetry scenario ''"),
        ("bussy", "unknown fake telemetry scenario 'bussy'.*known: busy"),
        ("busy:temp=90", "unknown key 'temp'.*allowed: after"),
        ("busy:after", "expected key=value"),
        ("busy:after=1,after=2", "given twice"),
        ("busy:after=-1", "must not be negative"),
        ("busy:after=soon", "is not a number"),
        ("busy:for=0", "more than 0 seconds"),
        ("busy:util=150", "percent"),
        ("busy:gain=0", "more than 0"),
        ("pressure:free=lots", "is not a size"),
        ("flaky:every=1.5", "whole number"),
        ("idle:perproc=2", "0 or 1"),
        ("hot:temp=nan", "is not a number"),
    ],
)
def test_parse_errors_are_clear(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_scenario(spec)


def test_constructor_rejects_bad_spec() -> None:
    with pytest.raises(ValueError, match="unknown fake telemetry scenario"):
        FakeTelemetry("nope", uuid=UUID)


# --- scenarios ---------------------------------------------------------------------------------


def test_idle_reflects_only_the_keeper() -> None:
    clock, keeper = Clock(), Keeper()
    tel = make("idle", clock, keeper, mem_total_bytes=24 * GiB)
    quiet = tel.sample()
    assert quiet.util_pct == 0.0 and quiet.own_util_pct == 0.0
    assert quiet.pstate == "P8" and quiet.temp_c == 40.0 and quiet.power_w == 70.0
    assert quiet.mem_used_bytes == BASELINE_BYTES and quiet.mem_total_bytes == 24 * GiB
    assert quiet.uuid == UUID and quiet.name == "Fake GPU" and quiet.error is None
    keeper.duty, keeper.held = 0.3, 4 * GiB
    clock.now += 100
    held = tel.sample()
    assert held.util_pct == pytest.approx(30.0) and held.own_util_pct == pytest.approx(30.0)
    assert held.pstate == "P0" and held.sm_clock_mhz is not None and held.sm_clock_mhz > 1000
    assert held.mem_used_bytes == BASELINE_BYTES + 4 * GiB
    assert held.temp_c is not None and held.temp_c > 40.0
    assert held.power_w is not None and held.power_w > 70.0
    assert others(held) == []
    assert held.processes is not None and held.processes[0].used_bytes == 4 * GiB


def test_gain_models_over_reading_and_caps_at_100() -> None:
    clock, keeper = Clock(), Keeper(duty=0.1)
    tel = make("idle:gain=3", clock, keeper)
    s = tel.sample()
    assert s.util_pct == pytest.approx(30.0) and s.own_util_pct == pytest.approx(30.0)
    keeper.duty = 0.5
    assert tel.sample().util_pct == 100.0


def test_busy_event_timing() -> None:
    clock, keeper = Clock(), Keeper(duty=0.3)
    tel = make("busy:after=2,for=5", clock, keeper)
    clock.now += 1.999
    before = tel.sample()
    assert others(before) == [] and before.util_pct == pytest.approx(30.0)
    assert before.extra["event"] is False
    clock.now += 0.001
    during = tel.sample()
    (other,) = others(during)
    assert other.pid >= FAKE_PID_BASE and other.uid == os.getuid() + 1
    assert other.util_pct == 85.0 and other.used_bytes == GiB
    assert during.util_pct == 100.0  # 30 own + 85 other, capped
    assert during.own_util_pct == pytest.approx(30.0)  # the other process is not ours
    assert during.mem_used_bytes == BASELINE_BYTES + GiB
    clock.now += 4.999
    assert others(tel.sample()) != []
    clock.now += 0.001
    after = tel.sample()
    assert others(after) == [] and after.extra["event"] is False


def test_busy_custom_util_with_idle_keeper() -> None:
    clock = Clock()
    tel = make("busy:after=0,util=40", clock, Keeper())
    s = tel.sample()
    assert s.util_pct == 40.0 and s.own_util_pct == 0.0 and s.pstate == "P0"


@pytest.mark.parametrize("held", [0, 10 * GiB, 70 * GiB])
def test_pressure_keeps_free_memory_tiny_whatever_the_keeper_gives_back(held: int) -> None:
    clock, keeper = Clock(), Keeper(held=held)
    tel = make("pressure:after=1,for=10", clock, keeper)
    assert others(tel.sample()) == []
    clock.now += 1
    s = tel.sample()
    (greedy,) = others(s)
    assert greedy.uid == os.getuid()  # same user
    assert s.mem_free_bytes == 128 * MiB
    clock.now += 10
    after = tel.sample()
    (relaxed,) = others(after)
    assert relaxed.used_bytes == PRESSURE_AFTER_BYTES
    assert after.mem_used_bytes == BASELINE_BYTES + held + PRESSURE_AFTER_BYTES


def test_pressure_free_key_and_foreign_user() -> None:
    clock, keeper = Clock(), Keeper(held=GiB)
    tel = make("foreign-pressure:after=0,free=1GiB", clock, keeper)
    s = tel.sample()
    (greedy,) = others(s)
    assert greedy.uid == os.getuid() + 1
    assert s.mem_free_bytes == GiB


def test_hot_event() -> None:
    clock = Clock()
    tel = make("hot:after=5,for=10,temp=95", clock, Keeper())
    assert tel.sample().temp_c == 40.0
    clock.now += 5
    assert tel.sample().temp_c == 95.0
    clock.now += 10
    assert tel.sample().temp_c == 40.0


def test_hot_default_temperature() -> None:
    clock = Clock()
    tel = make("hot:after=0", clock, Keeper())
    assert tel.sample().temp_c == 90.0


def test_lost_from_after_on() -> None:
    clock, keeper = Clock(), Keeper(duty=0.3, held=GiB)
    tel = make("lost:after=3", clock, keeper)
    assert tel.sample().lost is False
    clock.now += 3
    for _ in range(2):
        s = tel.sample()
        assert s.lost is True and s.error == "gpu lost" and s.uuid == UUID
        assert s.util_pct is None and s.own_util_pct is None and s.mem_used_bytes is None
        assert s.temp_c is None and s.power_w is None and s.processes is None
        clock.now += 1000


def test_no_util_always() -> None:
    clock, keeper = Clock(), Keeper(duty=0.5, held=GiB)
    tel = make("no-util", clock, keeper)
    s = tel.sample()
    assert s.util_pct is None and s.own_util_pct is None
    assert s.mem_used_bytes == BASELINE_BYTES + GiB and s.temp_c is not None
    assert s.processes is not None and all(p.util_pct is None for p in s.processes)
    assert s.pstate == "P0"
    clock.now += 10_000
    assert tel.sample().util_pct is None


def test_per_process_unsupported_keeps_device_util() -> None:
    clock = Clock()
    s = make("idle:perproc=0", clock, Keeper(duty=0.2)).sample()
    assert s.util_pct == pytest.approx(20.0) and s.own_util_pct is None


def test_flaky_every_nth_sample() -> None:
    clock = Clock()
    tel = make("flaky:every=3", clock, Keeper(duty=0.3))
    samples = [tel.sample() for _ in range(6)]
    bad = [i for i, s in enumerate(samples) if s.util_pct is None]
    assert bad == [2, 5]
    assert all(samples[i].error is not None and samples[i].own_util_pct is None for i in bad)
    assert all(samples[i].error is None for i in (0, 1, 3, 4))
    assert samples[2].mem_total_bytes is not None


def test_own_pids_decide_what_counts_as_own() -> None:
    clock = Clock()
    tel = make("idle", clock, Keeper(duty=0.4))
    assert tel.sample(own_pids=[4242]).own_util_pct == pytest.approx(40.0)
    foreign = tel.sample(own_pids=[1])
    assert foreign.own_util_pct == 0.0 and foreign.util_pct == pytest.approx(40.0)


def test_default_clock_and_pid() -> None:
    tel = FakeTelemetry(uuid=UUID)
    assert tel.own_pid == os.getpid() and tel.backend == "fake"
    s = tel.sample()
    assert s.processes is not None and s.processes[0].pid == os.getpid()
    assert s.mem_total_bytes == 80 * GiB and s.extra["scenario"] == "idle"
    tel.close()


# --- fake UUIDs --------------------------------------------------------------------------------


def test_fake_device_uuid() -> None:
    assert fake_device_uuid("3") == "GPU-fa4e0000-0000-4000-8000-000000000003"
    assert fake_device_uuid(" 12 ") == "GPU-fa4e0000-0000-4000-8000-000000000012"
    real = "GPU-8d2f3a1c-0000-1111-2222-333344445555"
    assert fake_device_uuid(real) == real
    assert fake_device_uuid("MIG-abc") == "MIG-abc"
    odd = fake_device_uuid("weird/entry")
    assert odd == fake_device_uuid("weird/entry") and odd.startswith("GPU-fa4e0000-")
    assert len(odd) == len(fake_device_uuid("1")) and odd != fake_device_uuid("other")
    with pytest.raises(ValueError):
        fake_device_uuid(" ")
