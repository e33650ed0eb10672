"""Supervisor configuration: the validated form of the `keepgpu-supervise` options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keepgpu.protocol.units import VramRequest

ENGINES = ("auto", "cuda", "rocm", "mps", "cpu", "fake")


@dataclass
class WorkerSettings:
    """What each worker is told at spawn (and what `set` may change later)."""

    engine: str = "fake"
    vram: VramRequest = field(default_factory=lambda: VramRequest(bytes=1024**3))
    mode: str = "duty"
    target_util: float = 30.0
    busy_threshold: float = 10.0
    max_temp: float = 83.0
    on_pressure: str = "yield"
    heartbeat_s: float = 2.0

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
    hang_timeout_s: float = 10.0
    start_timeout_s: float = 120.0
    join_timeout_s: float = 5.0
    kill_timeout_s: float = 5.0
    max_restarts: int = 5
    restart_window_s: float = 300.0
    restart_delay_s: float = 1.0
    restart_delay_max_s: float = 60.0
    healthy_reset_s: float = 60.0

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
