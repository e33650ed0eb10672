"""Supervisor configuration: the validated form of the `keepgpu-supervise` options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keepgpu.protocol import defaults as d
from keepgpu.protocol.units import VramRequest, parse_vram

ENGINES = ("auto", "cuda", "rocm", "mps", "cpu", "fake")


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


@dataclass
class SupervisorConfig:
    """Timeouts in seconds (monotonic clock)."""

    name: str = "default"
    gpus: str = "all"
    control: str | None = None  # explicit tcp:// endpoint; None = ipc in the runtime dir
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    hang_timeout_s: float = d.HANG_TIMEOUT_S
    start_timeout_s: float = d.START_TIMEOUT_S
    join_timeout_s: float = d.JOIN_TIMEOUT_S
    kill_timeout_s: float = d.KILL_TIMEOUT_S
    max_restarts: int = d.MAX_RESTARTS
    restart_window_s: float = d.RESTART_WINDOW_S
    restart_delay_s: float = d.RESTART_DELAY_S
    restart_delay_max_s: float = d.RESTART_DELAY_MAX_S
    healthy_reset_s: float = d.HEALTHY_RESET_S

    def public(self) -> dict[str, Any]:
        """The config as shown in `status` (protocol field supervisor.config)."""
        return {
            "gpus": self.gpus,
            **self.worker.to_wire(),
            "hang_timeout_s": self.hang_timeout_s,
            "start_timeout_s": self.start_timeout_s,
            "join_timeout_s": self.join_timeout_s,
            "kill_timeout_s": self.kill_timeout_s,
            "max_restarts": self.max_restarts,
            "restart_window_s": self.restart_window_s,
            "restart_delay_s": self.restart_delay_s,
        }
