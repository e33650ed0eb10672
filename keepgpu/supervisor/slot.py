"""Per-GPU slot: the state of one worker as the supervisor sees it.

States: starting -> holding <-> backoff -> stopping -> stopped, plus restarting (waiting out a
restart delay), yielded (worker stopped, memory lent to watched pids until they end: `yield`) and
the terminal fatal / unkillable. The event loop drives transitions; this
module keeps the record and renders it for `status`.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass, field
from typing import Any

from keepgpu.supervisor.policy import RestartPolicy

RUNNING_STATES = ("starting", "holding", "backoff", "stopping")
LIVE_STATES = ("holding", "backoff")
DONE_STATES = ("stopped", "fatal", "unkillable")

TELEMETRY_FIELDS = (
    "util_pct",
    "own_util_pct",
    "mem_used_bytes",
    "mem_total_bytes",
    "temp_c",
    "power_w",
    "pstate",
    "duty_pct",
    "duty_target_pct",
    "others_util_pct",
    "probing",
    "target_reachable",
    "telemetry_error",
    "policy",
    "other_processes",
)


@dataclass
class StopOp:
    """An in-flight stop of one slot. `then` = what follows: 'stopped' or 'restart'."""

    started: float
    then: str
    join_deadline: float
    kill_deadline: float | None = None
    outcome: str | None = None  # released | killed | unkillable
    finished: float | None = None


@dataclass
class Slot:
    gpu: int
    device_entry: str
    uuid: str | None
    policy: RestartPolicy
    state: str = "stopped"
    reason: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    incarnation: int = 0
    restarts: int = 0
    spawned_at: float = 0.0
    ready_at: float | None = None
    last_hb: float | None = None
    hb_progress: int | None = None
    restart_at: float | None = None
    last_exit: dict[str, Any] | None = None
    error: str | None = None
    errors_seen: int = 0  # `error` messages received, for the last-words wait
    stop: StopOp | None = None
    name: str | None = None
    held_bytes: int | None = None
    mem_total_bytes: int | None = None  # from READY; kept across restarts
    telemetry: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    paused_until: float | None = None  # monotonic; inf = until resume
    # The overrides before the last `set`, restored if the worker refuses it.
    overrides_before_set: dict[str, Any] | None = None
    # A control change came while starting: repeat it once the worker is READY.
    changed_while_starting: bool = False
    unkillable_pid: int | None = None
    # Pids this GPU is yielded to (`yield`): it holds again once every one has ended.
    yielded_to: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else self.unkillable_pid

    def clear_runtime(self) -> None:
        """Forget what the last incarnation reported (its telemetry is stale once it is gone)."""
        self.ready_at = None
        self.last_hb = None
        self.hb_progress = None
        self.held_bytes = None
        self.telemetry = {}

    def status(self, now: float) -> dict[str, Any]:
        """One entry of the `status` result's `gpus` list (docs/protocol.md)."""
        hb_age = None if self.last_hb is None else round(now - self.last_hb, 3)
        out: dict[str, Any] = {
            "gpu": self.gpu,
            "device_entry": self.device_entry,
            "uuid": self.uuid,
            "name": self.name,
            "state": self.state,
            "reason": self.reason,
            "pid": self.pid,
            "incarnation": self.incarnation,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "heartbeat_age_s": hb_age,
            "held_bytes": self.held_bytes,
        }
        for key in TELEMETRY_FIELDS:
            out[key] = self.telemetry.get(key)
        out["error"] = self.error
        # For `explain`: what would change the state (read here, no per-tick work).
        out["restarts_in_window"] = self.policy.in_window(now)
        out["restart_in_s"] = (None if self.restart_at is None or self.state != "restarting"
                               else round(max(0.0, self.restart_at - now), 3))
        left = None if self.paused_until is None else self.paused_until - now
        if left is not None and left <= 0:
            left = None  # a timed pause that has run out
        out["pause_left_s"] = None if left is None or math.isinf(left) else round(left, 3)
        out["paused_forever"] = left is not None and math.isinf(left)
        out["yielded_to"] = sorted(self.yielded_to)
        return out
