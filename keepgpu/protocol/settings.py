"""The settings every worker gets from the supervisor at spawn (and that `set` may change):
one definition for both sides of the workers socket."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keepgpu.protocol import defaults as d
from keepgpu.protocol.units import VramRequest, parse_vram


@dataclass
class WorkerSettings:
    """What each worker is told at spawn (and what `set` may change later)."""

    engine: str = "fake"
    vram: VramRequest = parse_vram(d.VRAM)
    mode: str = d.MODE
    target_util: float = d.TARGET_UTIL
    busy_threshold: float = d.BUSY_THRESHOLD
    max_temp: float = d.MAX_TEMP
    on_pressure: str = d.ON_PRESSURE
    heartbeat_s: float = d.HEARTBEAT_S

    def to_wire(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "vram": self.vram.to_wire(),
            "mode": self.mode,
            "target_util": self.target_util,
            "busy_threshold": self.busy_threshold,
            "max_temp": self.max_temp,
            "on_pressure": self.on_pressure,
            "heartbeat_s": self.heartbeat_s,
        }
