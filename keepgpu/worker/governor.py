"""What the keep loop should do right now: pulse or back off, at which duty, holding how much.

Combines the duty controller (keepgpu.worker.controller) and the politeness rules
(keepgpu.worker.policy) into one `Decision` per control tick. Pure apart from reading the live
`Settings`; every time is passed in (monotonic seconds).

State and reason, first match wins:
  backoff/paused   `keepgpu-ctl pause` (until resume or its seconds run out)
  backoff/thermal  temperature above --max-temp (until 5 C below)
  backoff/busy     other processes' load above --busy-threshold
  backoff/pressure VRAM given back to a process of our own user (pulses go on)
  holding/no-telemetry  device utilization unknown: pulses go on at the last duty
  holding/pressure-held memory is short but the hold is kept (other users, or --on-pressure hold)
  holding/None
A lost device raises DeviceLost (the worker exits 1; the supervisor restarts it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from dataclasses import dataclass

from keepgpu.telemetry.base import GpuSample
from keepgpu.worker.controller import DutyController, QuietProbe
from keepgpu.worker.engines.base import EngineError
from keepgpu.worker.policy import (
    BusyRule,
    Fresh,
    PressureRule,
    ThermalRule,
    attributed_others,
)
from keepgpu.worker.settings import Settings

#: After pulses stop or start, NVML's window still shows the other regime for this long.
SETTLE_S = 1.0


class DeviceLost(EngineError):
    """The telemetry says the device fell off the bus (NVML_ERROR_GPU_IS_LOST)."""


@dataclass(frozen=True)
class Decision:
    state: str  # holding | backoff
    reason: str | None  # busy | thermal | pressure | paused | no-telemetry | pressure-held
    duty: float  # fraction of wall time to spend in pulses, 0..1 (0 = no pulses)
    hold_bytes: int | None = None  # None: hold what --vram asks
    others_util_pct: float | None = None  # the other processes' load as judged, percent
    probing: bool = False  # a quiet probe is on (no pulses, state unchanged)
    #: False: the duty is at its maximum and utilization still below --target-util; None:
    #: not judged now (pstate mode, pulses off, utilization unknown).
    target_reachable: bool | None = None


class Governor:
    def __init__(
        self,
        settings: Settings,
        now: float,
        own_pids: Collection[int] | None = None,
        uid: int | None = None,
    ) -> None:
        self.settings = settings
        self.own_pids = frozenset(own_pids if own_pids is not None else (os.getpid(),))
        self.controller = DutyController(settings.target_util)
        self.probe = QuietProbe(now)
        self.busy = BusyRule()
        self.thermal = ThermalRule()
        self.pressure = PressureRule(os.getuid() if uid is None else uid)
        self.util = Fresh()
        self.temp = Fresh()
        self.others = Fresh()
        self.quiet_since: float | None = now  # no pulses yet
        self.active_since: float | None = None
        self.paused_until: float | None = None
        if settings.paused_forever:
            self.paused_until = math.inf
        elif settings.paused_s:
            self.paused_until = now + settings.paused_s

    def pause(self, seconds: float | None, now: float) -> None:
        self.paused_until = math.inf if seconds is None else now + seconds

    def resume(self) -> None:
        self.paused_until = None

    def _paused(self, now: float) -> bool:
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
        return self.paused_until is not None

    def decide(
        self,
        sample: GpuSample | None,
        now: float,
        held_bytes: int = 0,
        target_bytes: int = 0,
        own_duty: float = 0.0,
    ) -> Decision:
        """One control step. `own_duty`: measured fraction of recent wall time in our pulses.

        Raises DeviceLost when the sample says the device is lost.
        """
        if sample is not None and sample.lost:
            raise DeviceLost(f"GPU {sample.uuid or '?'} lost: {sample.error or 'gone'}")
        s = self.settings
        self.controller.retarget(s.target_util)
        raw_util = sample.util_pct if sample is not None else None
        util = self.util.update(raw_util, now)
        temp = self.temp.update(sample.temp_c if sample is not None else None, now)
        others, probing = self._others(sample, raw_util, own_duty, now)
        paused = self._paused(now)
        hot = self.thermal.update(temp, s.max_temp)
        busy = self.busy.update(others, s.busy_threshold, now)
        mem = self.pressure.update(sample, self.own_pids, held_bytes, target_bytes,
                                   s.on_pressure, now)
        reason: str | None
        if paused or hot or busy:
            state, reason = "backoff", "paused" if paused else "thermal" if hot else "busy"
        elif mem.status == "yielded":
            state, reason = "backoff", "pressure"
        elif util is None:
            state, reason = "holding", "no-telemetry"
        else:
            state, reason = "holding", "pressure-held" if mem.status == "held" else None
        quiet = (state == "backoff" and reason != "pressure") or probing
        duty = 0.0 if quiet else self._duty(raw_util, now)
        self._track_quiet(quiet, now)
        steered = not quiet and s.mode != "pstate" and raw_util is not None
        reachable = self.controller.reachable(now) if steered else None
        return Decision(state, reason, duty, mem.cap_bytes, others, probing, reachable)

    def _duty(self, raw_util: float | None, now: float) -> float:
        if self.settings.mode == "pstate":
            self.controller.hold(now)
            return 1.0  # pstate pulses run on their own fixed schedule
        settled = self.active_since is not None and now - self.active_since >= SETTLE_S
        if not settled:
            self.controller.hold(now)
            return self.controller.duty
        return self.controller.update(raw_util, now)

    def _track_quiet(self, quiet: bool, now: float) -> None:
        if quiet:
            self.active_since = None
            if self.quiet_since is None:
                self.quiet_since = now
        else:
            self.quiet_since = None
            if self.active_since is None:
                self.active_since = now

    def _others(
        self, sample: GpuSample | None, raw_util: float | None, own_duty: float, now: float
    ) -> tuple[float | None, bool]:
        """The others' load (%) as judged now, and whether a quiet probe is on."""
        attributed = attributed_others(sample, self.own_pids) if sample is not None else None
        if attributed is not None:
            self.probe.defer(now)
            return self.others.update(attributed, now), False
        recent = self.others.get(now)
        if recent is not None:
            return recent, False  # per-process data missing for a moment (flaky call)
        quiet_for = None if self.quiet_since is None else now - self.quiet_since
        active_for = None if self.active_since is None else now - self.active_since
        probing = self.probe.update(raw_util, own_duty, self.settings.busy_threshold,
                                    quiet_for, active_for, now)
        # Between probes the last probe's result stands (refreshed every PROBE_EVERY_S, and
        # sooner when the device reads above what our own duty explains).
        return self.probe.others_pct, probing
