"""The keep loop end to end: the real supervisor, fake engine, fake telemetry scenarios.

Every supervisor is started by the `start_sup` fixture and cleaned up by pid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from kgtest import Sup, wait_until

from keepgpu.client import NoSupervisor

GiB = 1024**3
MiB = 1024**2
FAST = ("--gpus", "0", "--heartbeat", "0.2", "--vram", "1GiB")

pytestmark = pytest.mark.timeout(60)

Gpu = dict[str, Any]


def start(start_sup: Callable[..., Sup], scenario: str, *args: str) -> tuple[Sup, Gpu]:
    sup = start_sup(*FAST, *args, env={"KEEPGPU_FAKE_TELEMETRY": scenario})
    first = sup.wait_states("holding", timeout=10)[0]
    return sup, first


def wait_gpu(sup: Sup, pred: Callable[[Gpu], bool], timeout: float = 15.0) -> Gpu:
    def check() -> Gpu | None:
        if sup.proc.poll() is not None:
            raise AssertionError(f"supervisor exited {sup.proc.returncode}:\n{sup.log()}")
        try:
            g = sup.gpus()[0]
        except NoSupervisor:  # not listening yet
            return None
        try:
            return g if pred(g) else None
        except TypeError:  # a reading still null (no heartbeat since READY yet)
            return None

    return wait_until(check, timeout)  # type: ignore[no-any-return]


def state(g: Gpu) -> tuple[str, str | None]:
    return g["state"], g["reason"]


def worker_lines(sup: Sup, needle: str) -> list[str]:
    return [line for line in sup.log().splitlines() if "keepgpu-worker" in line and needle in line]


def test_busy_backs_off_then_holds_again(start_sup: Callable[..., Sup]) -> None:
    sup, first = start(start_sup, "busy:after=0.5,for=2")
    busy = wait_gpu(sup, lambda g: state(g) == ("backoff", "busy"))
    assert busy["held_bytes"] == GiB  # memory kept
    # once our last pulses have left the 1 s window, the device shows the others' load alone
    quiet = wait_gpu(sup, lambda g: g["reason"] == "busy" and g["util_pct"] < 90, timeout=3)
    assert quiet["util_pct"] == pytest.approx(85.0, abs=1) and quiet["own_util_pct"] < 1
    assert quiet["duty_pct"] < 5
    back = wait_gpu(sup, lambda g: state(g) == ("holding", None))
    assert back["pid"] == first["pid"]
    wait_gpu(sup, lambda g: g["duty_pct"] > 20)
    assert len(worker_lines(sup, "state=backoff reason=busy")) == 1
    assert len(worker_lines(sup, "state=holding reason=-")) == 1


def test_hot_backs_off_for_thermal_and_max_temp_is_live(start_sup: Callable[..., Sup]
                                                         ) -> None:
    sup, _ = start(start_sup, "hot:after=0.5,temp=88")
    hot = wait_gpu(sup, lambda g: state(g) == ("backoff", "thermal"))
    assert hot["temp_c"] == 88.0 and hot["held_bytes"] == GiB
    wait_gpu(sup, lambda g: g["duty_pct"] == 0, timeout=3)
    sup.call("set", {"max_temp": 90})  # 88 is not 5 C below 90: still too hot
    time.sleep(0.6)
    assert sup.gpus()[0]["reason"] == "thermal"
    assert sup.ctl("set", "--max-temp", "95").returncode == 0
    wait_gpu(sup, lambda g: state(g) == ("holding", None) and g["duty_pct"] > 5, timeout=4)


def test_pressure_from_our_user_shrinks_then_regrows(start_sup: Callable[..., Sup]) -> None:
    sup, _ = start(start_sup, "pressure:after=0.5,for=1.5")
    low = wait_gpu(sup, lambda g: g["held_bytes"] < GiB)
    assert state(low) == ("backoff", "pressure")
    wait_gpu(sup, lambda g: g["held_bytes"] == 0)
    back = wait_gpu(sup, lambda g: state(g) == ("holding", None), timeout=12)
    assert back["held_bytes"] == GiB
    assert len(worker_lines(sup, "hold shrunk")) >= 1


def test_foreign_pressure_keeps_the_hold(start_sup: Callable[..., Sup]) -> None:
    sup, _ = start(start_sup, "foreign-pressure:after=0.5")
    held = wait_gpu(sup, lambda g: g["reason"] == "pressure-held")
    assert held["state"] == "holding"
    for _ in range(8):  # stays held for a while
        g = sup.gpus()[0]
        assert g["held_bytes"] == GiB and g["reason"] == "pressure-held"
        time.sleep(0.2)


def test_no_util_keeps_the_duty_and_says_so(start_sup: Callable[..., Sup]) -> None:
    sup, _ = start(start_sup, "no-util")
    g = wait_gpu(sup, lambda g: g["reason"] == "no-telemetry" and g["duty_pct"] > 20)
    assert g["state"] == "holding"
    assert g["util_pct"] is None and g["own_util_pct"] is None  # unknown is null, not 0
    assert g["mem_total_bytes"] == 80 * GiB and g["temp_c"] is not None
    assert g["duty_pct"] == pytest.approx(30.0, abs=8)


def test_pause_resume_and_timed_pause(start_sup: Callable[..., Sup]) -> None:
    sup, first = start(start_sup, "idle")
    wait_gpu(sup, lambda g: g["duty_pct"] > 20)
    t0 = time.monotonic()
    assert sup.call("pause")["gpus"][0]["applied"] is True
    paused = wait_gpu(sup, lambda g: state(g) == ("backoff", "paused"), timeout=2)
    assert time.monotonic() - t0 < 1.0  # the worker heartbeats at once on a pause
    assert paused["held_bytes"] == GiB
    wait_gpu(sup, lambda g: g["duty_pct"] == 0, timeout=3)
    assert sup.ctl("pause").returncode == 0  # the CLI path too
    assert sup.ctl("resume").returncode == 0
    wait_gpu(sup, lambda g: state(g) == ("holding", None), timeout=2)
    assert sup.ctl("pause", "--seconds", "1").returncode == 0
    wait_gpu(sup, lambda g: g["reason"] == "paused", timeout=2)
    back = wait_gpu(sup, lambda g: state(g) == ("holding", None), timeout=4)
    assert back["pid"] == first["pid"]


def test_set_vram_grows_and_shrinks_in_place(start_sup: Callable[..., Sup]) -> None:
    sup, first = start(start_sup, "idle")
    assert sup.ctl("set", "--vram", "3GiB").returncode == 0
    grown = wait_gpu(sup, lambda g: g["held_bytes"] == 3 * GiB)
    assert sup.ctl("set", "--vram", "512MiB").returncode == 0
    shrunk = wait_gpu(sup, lambda g: g["held_bytes"] == 512 * MiB)
    assert sup.ctl("set", "--vram", "5%").returncode == 0
    pct = wait_gpu(sup, lambda g: g["held_bytes"] == int(80 * GiB * 0.05))
    for g in (grown, shrunk, pct):
        assert (g["pid"], g["incarnation"], g["state"]) == (first["pid"], 1, "holding")
    # beyond the device (80 GiB): refused by the supervisor; the worker keeps its hold
    out = sup.ctl("set", "--vram", "100GiB")
    assert out.returncode == 1 and "exceeds" in out.stderr
    g = sup.gpus()[0]
    assert (g["pid"], g["held_bytes"], g["state"]) == (first["pid"], pct["held_bytes"], "holding")


def test_set_target_util_moves_the_duty(start_sup: Callable[..., Sup]) -> None:
    """The device reads our pulses twice as long (gain 2): the duty settles at half the
    target, which only a closed loop can find."""
    sup, first = start(start_sup, "idle:after=0,gain=2")
    low = wait_gpu(sup, lambda g: abs(g["duty_pct"] - 15) < 3 and abs(g["util_pct"] - 30) < 4,
                   timeout=15)
    assert sup.ctl("set", "--target-util", "60").returncode == 0
    high = wait_gpu(sup, lambda g: abs(g["duty_pct"] - 30) < 4 and abs(g["util_pct"] - 60) < 5,
                    timeout=10)
    assert low["pid"] == high["pid"] == first["pid"]


def test_set_mode_and_thresholds_take_effect(start_sup: Callable[..., Sup]) -> None:
    sup, first = start(start_sup, "busy:after=0.5,util=50")
    wait_gpu(sup, lambda g: g["reason"] == "busy")
    assert sup.ctl("set", "--busy-threshold", "60").returncode == 0
    wait_gpu(sup, lambda g: state(g) == ("holding", None))
    sup.call("set", {"mode": "pstate"})
    pstate = wait_gpu(sup, lambda g: 0 < g["duty_pct"] < 2, timeout=5)
    sup.call("set", {"mode": "duty", "busy_threshold": -1})
    duty = wait_gpu(sup, lambda g: g["duty_pct"] > 5, timeout=5)
    sup.call("set", {"busy_threshold": 10})
    wait_gpu(sup, lambda g: g["reason"] == "busy")
    assert pstate["pid"] == duty["pid"] == first["pid"]


def test_lost_gpu_exits_1_is_restarted_then_fatal(start_sup: Callable[..., Sup]) -> None:
    sup = start_sup(*FAST, "--max-restarts", "1", "--restart-delay", "0.1",
                    env={"KEEPGPU_FAKE_TELEMETRY": "lost:after=0.5"})
    assert sup.proc.wait(15) == 4  # every GPU fatal: the supervisor gives up
    log = sup.log()
    assert log.count("exited (exit code 1)") == 2  # lost, restarted once, lost again
    assert "state=fatal reason=restart-limit" in log
    lost = worker_lines(sup, "lost")
    assert len(lost) == 2 and "exiting for the supervisor to restart" in lost[0]


def test_status_carries_every_telemetry_field(start_sup: Callable[..., Sup]) -> None:
    sup, _ = start(start_sup, "idle")
    g = wait_gpu(sup, lambda g: g["duty_pct"] > 20 and g["pstate"] == "P0")
    for key in ("util_pct", "own_util_pct", "mem_used_bytes", "mem_total_bytes", "temp_c",
                "power_w", "pstate", "duty_pct"):
        assert g[key] is not None, key
    assert g["power_w"] > 70.0 and g["mem_used_bytes"] > GiB
