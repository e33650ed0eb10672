"""What the keep loop needs from an engine (torch on a real device, or the fake)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from keepgpu.telemetry.base import Telemetry

CHUNK_BYTES = 256 * 1024**2
MAX_PULSE_S = 0.010


class ConfigurationError(Exception):
    """The device cannot be used as configured (no such device, --vram above total): exit 78."""


class EngineError(Exception):
    """A runtime failure of the engine (e.g. the device was lost): exit 1, the supervisor
    restarts the worker."""


@dataclass(frozen=True)
class DeviceIdentity:
    uuid: str | None
    name: str | None
    mem_total_bytes: int | None


class Engine(Protocol):
    kind: str
    #: True only for the fake's "ignore STOP and SIGTERM" test mode.
    ignores_stop: bool

    def open(self) -> DeviceIdentity:
        """Initialise the device (raises ConfigurationError / EngineError)."""

    @property
    def held_bytes(self) -> int: ...

    def resize(self, nbytes: int) -> int:
        """Grow or shrink the hold in chunks towards `nbytes`; returns bytes now held. Stops
        growing (without raising) when the device is out of memory."""

    def pulse(self, mode: str, seconds: float) -> None:
        """Queue one burst of activity of about `seconds` (≤ MAX_PULSE_S, pstate much less)."""

    def busy(self) -> bool:
        """Whether the previous pulse is still running."""

    def own_duty(self) -> float:
        """Fraction of recent wall time spent in our pulses (0..1)."""

    def telemetry(self) -> Telemetry:
        """The telemetry source for this device (opened by UUID; null when unavailable)."""

    def release(self) -> None:
        """Free every chunk and wait for the device to be idle."""


class DutyMeter:
    """Fraction of the last `window_s` seconds covered by recorded pulses (own_duty)."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self._pulses: deque[tuple[float, float]] = deque()
        self._opened = time.monotonic()

    def record(self, start: float, seconds: float) -> None:
        self._pulses.append((start, start + seconds))

    def fraction(self) -> float:
        now = time.monotonic()
        start = now - self.window_s
        while self._pulses and self._pulses[0][1] < start:
            self._pulses.popleft()
        on = sum(max(0.0, min(e, now) - max(s, start)) for s, e in self._pulses)
        return min(1.0, on / min(self.window_s, max(1e-6, now - self._opened)))
