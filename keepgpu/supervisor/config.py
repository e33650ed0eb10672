"""Supervisor configuration: the validated form of the `keepgpu-supervise` options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keepgpu.protocol import defaults as d
from keepgpu.protocol.settings import WorkerSettings

ENGINES = ("auto", "cuda", "rocm", "mps", "cpu", "fake")

__all__ = ["ENGINES", "SupervisorConfig", "WorkerSettings"]


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
    max_hold_s: float | None = None  # --max-hold: release everything and exit after this long

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
            "max_hold_s": self.max_hold_s,
        }
