"""The worker's settings as sent by the supervisor (JSON), with live changes from `set`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keepgpu.protocol.units import VramRequest, parse_vram


@dataclass
class Settings:
    engine: str = "fake"
    vram: VramRequest = VramRequest(bytes=1024**3)
    mode: str = "duty"
    target_util: float = 30.0
    busy_threshold: float = 10.0
    max_temp: float = 83.0
    on_pressure: str = "yield"
    heartbeat_s: float = 1.0
    device_entry: str = ""
    paused_s: float | None = None
    paused_forever: bool = False

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Settings:
        s = cls()
        s.engine = str(data.get("engine", s.engine))
        s.device_entry = str(data.get("device_entry", ""))
        s.heartbeat_s = float(data.get("heartbeat_s", s.heartbeat_s))
        if "paused_s" in data:
            s.paused_s = data["paused_s"]
            s.paused_forever = data["paused_s"] is None
        s.apply(data)
        return s

    def apply(self, changes: dict[str, Any]) -> list[str]:
        """Apply `set` changes; returns the names that changed."""
        changed = []
        if "vram" in changes:
            self.vram = parse_vram(changes["vram"])
            changed.append("vram")
        for key in ("mode", "on_pressure"):
            if key in changes:
                setattr(self, key, str(changes[key]))
                changed.append(key)
        for key in ("target_util", "busy_threshold", "max_temp"):
            if key in changes:
                setattr(self, key, float(changes[key]))
                changed.append(key)
        return changed
