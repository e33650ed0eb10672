"""The KeepLoop itself: reaction times to STOP and pause, heartbeat contents, a lost device.

The loop runs in a thread with the fake engine; the test plays the supervisor over a real
ZeroMQ ROUTER socket (inproc).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from keepgpu.protocol import wire
from keepgpu.protocol.units import VramRequest
from keepgpu.telemetry.base import GpuSample
from keepgpu.worker.engines.fake import FakeEngine
from keepgpu.worker.faults import Faults
from keepgpu.worker.governor import Decision, DeviceLost
from keepgpu.worker.run import MAX_WAIT_S, KeepLoop, describe_change
from keepgpu.worker.settings import Settings

GiB = 1024**3
FIELDS = ("util_pct", "own_util_pct", "mem_used_bytes", "mem_total_bytes", "temp_c", "power_w",
          "pstate", "duty_pct", "target_reachable")


class RecordingEngine(FakeEngine):
    def __init__(self, scenario: str) -> None:
        super().__init__("0", Faults(), scenario)
        self.pulses: list[float] = []

    def pulse(self, mode: str, seconds: float) -> None:
        self.pulses.append(time.monotonic())
        super().pulse(mode, seconds)


class Harness:
    def __init__(self, scenario: str = "idle", **settings: Any) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        endpoint = f"inproc://keeploop-{uuid.uuid4().hex}"
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.bind(endpoint)
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.identity = wire.identity(0, 1)
        dealer.connect(endpoint)
        self.engine = RecordingEngine(scenario)
        base = {"engine": "fake", "vram": VramRequest(bytes=GiB), "heartbeat_s": 0.1,
                "device_entry": "0"}
        self.loop = KeepLoop(dealer, self.engine, Settings(**{**base, **settings}))
        self.loop.start()
        self.returned_at: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.messages: list[tuple[float, dict[str, Any]]] = []

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc
        self.returned_at = time.monotonic()

    def send(self, kind: str, **fields: Any) -> float:
        self.router.send_multipart([wire.identity(0, 1), wire.encode(kind, **fields)])
        return time.monotonic()

    def collect(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.router.poll(int(left * 1000) + 1):
                frames = self.router.recv_multipart()
                self.messages.append((time.monotonic(), json.loads(frames[1])))

    def close(self) -> None:
        self.loop.stop_requested = True
        self.thread.join(2)
        self.loop.sock.close(0)
        self.router.close(0)
        self.ctx.term()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def test_stop_takes_effect_within_50ms(harness: Harness) -> None:
    harness.thread.start()
    harness.collect(0.6)
    assert harness.engine.pulses, "pulsing before the stop"
    sent = harness.send("stop")
    harness.thread.join(1)
    assert harness.returned_at is not None and harness.error is None
    assert harness.returned_at - sent < MAX_WAIT_S


def test_pause_takes_effect_within_50ms_and_resume_restarts(harness: Harness) -> None:
    harness.thread.start()
    harness.collect(0.6)
    sent = harness.send("pause")
    harness.collect(0.5)
    assert [t for t in harness.engine.pulses if t > sent + MAX_WAIT_S] == []
    paused = [t for t, m in harness.messages
              if t > sent and m["t"] == "hb" and m["reason"] == "paused"]
    assert paused and paused[0] - sent < MAX_WAIT_S
    resumed = harness.send("resume")
    harness.collect(0.3)
    assert [t for t in harness.engine.pulses if t > resumed]


@pytest.mark.parametrize("mode", ["duty", "sm", "compute", "pstate"])
def test_pause_stops_pulses_in_every_mode(mode: str) -> None:
    h = Harness(mode=mode)
    try:
        h.thread.start()
        h.collect(0.6)
        assert h.engine.pulses, "pulsing before the pause"
        sent = h.send("pause")
        h.collect(0.5)
        assert [t for t in h.engine.pulses if t > sent + MAX_WAIT_S] == []
    finally:
        h.close()


def test_heartbeats_carry_every_telemetry_field(harness: Harness) -> None:
    harness.thread.start()
    harness.collect(0.7)
    beats = [m for _, m in harness.messages if m["t"] == "hb"]
    assert len(beats) >= 4
    for beat in beats:
        assert set(FIELDS) <= set(beat["telemetry"])
        assert beat["state"] in ("holding", "backoff")
    assert beats[-1]["telemetry"]["duty_pct"] > 10
    assert beats[-1]["held_bytes"] == GiB


def test_set_applies_every_field_at_once(harness: Harness) -> None:
    harness.thread.start()
    harness.send("set", vram="2GiB", mode="sm", target_util=50, busy_threshold=-1,
                 max_temp=70, on_pressure="hold")
    harness.collect(0.3)
    s = harness.loop.settings
    assert (s.vram, s.mode, s.target_util, s.busy_threshold, s.max_temp, s.on_pressure) == (
        VramRequest(bytes=2 * GiB), "sm", 50.0, -1.0, 70.0, "hold")
    assert harness.engine.held_bytes == 2 * GiB
    assert harness.loop.governor.controller.target_pct == 50.0
    harness.send("set", vram="2GiB", mode="bogus")  # refused whole
    harness.collect(0.2)
    assert harness.loop.settings.mode == "sm"
    errors = [m for _, m in harness.messages if m["t"] == "error"]
    assert errors and "set refused" in errors[0]["message"]


def test_lost_device_ends_the_loop_with_an_engine_error() -> None:
    h = Harness("lost:after=0.3")
    try:
        h.thread.start()
        h.thread.join(3)
        assert isinstance(h.error, DeviceLost)
    finally:
        h.close()


def test_state_change_log_line_names_the_readings() -> None:
    line, extra = describe_change(Decision("backoff", "busy", 0.0, None, 85.0), None, GiB,
                                  Settings())
    assert line.startswith("state=backoff reason=busy: ")
    assert "others 85%" in line and "util -" in line and "holding 1.0GiB" in line
    rec = extra["keepgpu_fields"]
    assert rec["event"] == "state" and rec["held_bytes"] == GiB and rec["util_pct"] is None
    sample = GpuSample(util_pct=100.0, own_util_pct=0.0, mem_used_bytes=2 * GiB,
                       mem_total_bytes=80 * GiB, temp_c=55.0, power_w=250.0, pstate="P0")
    line, extra = describe_change(Decision("holding", None, 0.3), sample, GiB, Settings())
    for part in ("util 100%", "own 0%", "55 °C", "250 W", "P0",
                 "memory 2.0GiB used of 80.0GiB", "duty 30%"):
        assert part in line, part
    assert str(GiB) not in line, "sizes in human units, not bytes"
    rec = extra["keepgpu_fields"]
    assert (rec["temp_c"], rec["power_w"], rec["mem_total_bytes"]) == (55.0, 250.0, 80 * GiB)
