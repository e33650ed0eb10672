"""The worker's settings as sent by the supervisor (JSON), with live changes from `set`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keepgpu.protocol.control import MODES
from keepgpu.protocol.settings import WorkerSettings
from keepgpu.protocol.units import parse_vram

_CHOICES: dict[str, tuple[str, ...]] = {"mode": MODES, "on_pressure": ("yield", "hold")}
_RANGES: dict[str, tuple[float, float]] = {
    "target_util": (1.0, 100.0),
    "busy_threshold": (-1.0, 100.0),
    "max_temp": (1.0, 150.0),
}


@dataclass
class Settings(WorkerSettings):
    """The spawn settings plus what only the worker needs: its device entry and a pause
    carried over from its predecessor."""

    device_entry: str = ""
    #: The device's UUID as the supervisor knows it (NVML / AMD SMI), None when it does not.
    uuid: str | None = None
    paused_s: float | None = None
    paused_forever: bool = False

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Settings:
        s = cls()
        s.engine = str(data.get("engine", s.engine))
        s.device_entry = str(data.get("device_entry", ""))
        uuid = data.get("uuid")
        s.uuid = uuid if isinstance(uuid, str) and uuid else None
        s.heartbeat_s = float(data.get("heartbeat_s", s.heartbeat_s))
        if "paused_s" in data:
            s.paused_s = data["paused_s"]
            s.paused_forever = data["paused_s"] is None
        s.apply(data)
        return s

    def apply(self, changes: dict[str, Any]) -> list[str]:
        """Apply `set` changes all at once; returns the names that changed.

        Raises ValueError (UnitError for vram) for any bad value, and then changes nothing.
        """
        new: dict[str, Any] = {}
        if "vram" in changes:
            new["vram"] = parse_vram(changes["vram"])
        for key, allowed in _CHOICES.items():
            if key in changes:
                value = str(changes[key])
                if value not in allowed:
                    raise ValueError(f"{key} must be one of {', '.join(allowed)}: {value!r}")
                new[key] = value
        for key, (low, high) in _RANGES.items():
            if key in changes:
                number = float(changes[key])
                if not low <= number <= high:
                    raise ValueError(f"{key} must be in [{low:g}, {high:g}]: {number:g}")
                new[key] = number
        changed = [key for key, value in new.items() if getattr(self, key) != value]
        for key, value in new.items():
            setattr(self, key, value)
        return changed
