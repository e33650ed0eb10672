"""The fake engine: no torch, no device. It simulates a VRAM hold (a byte counter in chunks) and
asynchronous pulses, pairs with the fake telemetry (`KEEPGPU_FAKE_TELEMETRY=<scenario>`), and
can misbehave on request for tests (keepgpu.worker.faults)."""

from __future__ import annotations

import os
import signal
import time

from keepgpu.protocol.units import UnitError, parse_size
from keepgpu.telemetry.base import Telemetry
from keepgpu.telemetry.fake import FakeTelemetry, fake_device_uuid
from keepgpu.worker.engines.base import (
    CHUNK_BYTES,
    ConfigurationError,
    DeviceIdentity,
    DutyMeter,
)
from keepgpu.worker.faults import Faults

_DUTY_WINDOW_S = 1.0


class FakeEngine:
    kind = "fake"

    def __init__(self, entry: str, faults: Faults, scenario: str = "idle") -> None:
        self.entry = entry
        self.faults = faults
        self.ignores_stop = faults.ignore_stop
        self.scenario = scenario
        self._held = 0
        self._busy_until = 0.0
        self._meter = DutyMeter(_DUTY_WINDOW_S)
        self._ready_at: float | None = None
        raw_total = os.environ.get("KEEPGPU_FAKE_MEM_TOTAL", "80GiB")
        try:
            self.mem_total = parse_size(raw_total)
        except UnitError as exc:
            raise ConfigurationError(f"KEEPGPU_FAKE_MEM_TOTAL: {exc}") from None
        self.uuid = fake_device_uuid(entry)
        self._telemetry: FakeTelemetry | None = None

    def open(self) -> DeviceIdentity:
        if self.faults.exit_config:
            raise ConfigurationError(f"fake device {self.entry} does not exist (test fault)")
        if self.faults.ignore_stop:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.faults.start_delay:
            time.sleep(self.faults.start_delay)
        self._telemetry = FakeTelemetry(
            self.scenario,
            uuid=self.uuid,
            name=f"Fake GPU {self.entry}",
            mem_total_bytes=self.mem_total,
            own_duty=self.own_duty,
            own_held=lambda: self._held,
        )
        return DeviceIdentity(self.uuid, f"Fake GPU {self.entry}", self.mem_total)

    def mark_ready(self) -> None:
        self._ready_at = time.monotonic()

    @property
    def held_bytes(self) -> int:
        return self._held

    def resize(self, nbytes: int) -> int:
        chunks = -(-max(0, nbytes) // CHUNK_BYTES)
        self._held = min(nbytes, chunks * CHUNK_BYTES, self.mem_total)
        return self._held

    def pulse(self, mode: str, seconds: float) -> None:
        self._check_faults()
        now = time.monotonic()
        self._busy_until = now + seconds
        self._meter.record(now, seconds)

    def _check_faults(self) -> None:
        if self._ready_at is None:
            return
        up = time.monotonic() - self._ready_at
        if self.faults.crash_after is not None and up >= self.faults.crash_after:
            os._exit(3)
        if self.faults.hang_after is not None and up >= self.faults.hang_after:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:  # a stuck device call: alive, silent, deaf to STOP and SIGTERM
                time.sleep(3600)

    def tick(self) -> None:
        """Called by the keep loop every iteration, paused or not (faults fire on time)."""
        self._check_faults()

    def busy(self) -> bool:
        return time.monotonic() < self._busy_until

    def own_duty(self) -> float:
        return self._meter.fraction()

    def telemetry(self) -> Telemetry:
        assert self._telemetry is not None
        return self._telemetry

    def release(self) -> None:
        if self.faults.release_delay:
            time.sleep(self.faults.release_delay)
        self._held = 0
