"""What the keep loop should do right now: pulse or back off, at which duty, holding how much.

This is the fixed-duty governor: pulses at `target_util` percent unless paused; it reports
`no-telemetry` when the device cannot be read (and keeps its duty cycle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from keepgpu.telemetry.base import GpuSample
from keepgpu.worker.settings import Settings


@dataclass(frozen=True)
class Decision:
    state: str  # holding | backoff
    reason: str | None  # busy | thermal | pressure | paused | no-telemetry
    duty: float  # fraction of wall time to spend in pulses, 0..1
    hold_bytes: int | None = None  # None: hold what --vram asks


class Governor:
    def __init__(self, settings: Settings, now: float) -> None:
        self.settings = settings
        self.paused_until: float | None = None
        if settings.paused_forever:
            self.paused_until = math.inf
        elif settings.paused_s:
            self.paused_until = now + settings.paused_s

    def pause(self, seconds: float | None, now: float) -> None:
        self.paused_until = math.inf if seconds is None else now + seconds

    def resume(self) -> None:
        self.paused_until = None

    def decide(self, sample: GpuSample | None, now: float) -> Decision:
        if self.paused_until is not None:
            if now < self.paused_until:
                return Decision("backoff", "paused", 0.0)
            self.paused_until = None
        duty = max(0.0, min(1.0, self.settings.target_util / 100.0))
        blind = sample is None or sample.util_pct is None
        return Decision("holding", "no-telemetry" if blind else None, duty)
