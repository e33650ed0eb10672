"""Politeness rules of the keep loop. Pure: every input is a value, every time is passed in.

- busy: the OTHER processes' load (never the keeper's own) above `--busy-threshold` -> no pulses
  until it has stayed at or below the threshold for BUSY_CLEAR_S. -1 disables the rule.
- thermal: above `--max-temp` -> no pulses until THERMAL_HYSTERESIS_C below it.
- pressure: free memory below `reserve_bytes(total)` while another process holds memory. With
  `--on-pressure yield` and a process of our own user among those, the hold shrinks at once by
  the deficit (whole chunks, down to 0) and regrows one chunk per control tick once free memory
  is back above reserve + one chunk (and REGROW_DELAY_S after the last yield). Against other
  users only, or with `--on-pressure hold`, the hold is kept (reported as `pressure-held`).
- A reading that is missing for a moment (a flaky NVML call) keeps its last value for STALE_S.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from keepgpu.telemetry.base import GpuSample
from keepgpu.worker.engines.base import CHUNK_BYTES

MiB = 1024**2

BUSY_CLEAR_S = 2.0
THERMAL_HYSTERESIS_C = 5.0
RESERVE_MIN_BYTES = 512 * MiB
RESERVE_FRACTION = 0.02
REGROW_DELAY_S = 2.0
STALE_S = 1.0


def reserve_bytes(total_bytes: int) -> int:
    """Free memory we leave to others before yielding: max(512 MiB, 2 % of the device)."""
    return max(RESERVE_MIN_BYTES, int(total_bytes * RESERVE_FRACTION))


class Fresh:
    """The last known value of a reading, forgotten STALE_S seconds after it was seen."""

    def __init__(self, stale_s: float = STALE_S) -> None:
        self.stale_s = stale_s
        self.value: float | None = None
        self.seen_at = -math.inf

    def update(self, value: float | None, now: float) -> float | None:
        if value is not None:
            self.value, self.seen_at = value, now
        return self.get(now)

    def get(self, now: float) -> float | None:
        return self.value if now - self.seen_at <= self.stale_s else None


def attributed_others(sample: GpuSample, own_pids: Collection[int]) -> float | None:
    """Other processes' utilization (%) from per-process data; None where it cannot be told.

    Sum of the other PIDs' utilization when the driver reports it per process; else device
    utilization minus our own. None when per-process utilization is unsupported, or when our
    own PID is not among the device's processes (a PID namespace: the PIDs are the host's).
    """
    if sample.own_util_pct is None or sample.extra.get("own_pid_visible") is False:
        return None
    if sample.processes is not None:
        loads = [p.util_pct for p in sample.processes if p.pid not in own_pids]
        if any(u is None for u in loads):
            return None
        return min(100.0, sum(u for u in loads if u is not None))
    if sample.util_pct is None:
        return None
    return max(0.0, sample.util_pct - sample.own_util_pct)


class BusyRule:
    """Back off while others' load is above the threshold; clear after BUSY_CLEAR_S at/below."""

    def __init__(self) -> None:
        self.active = False
        self.calm_since: float | None = None

    def update(self, others_pct: float | None, threshold: float, now: float) -> bool:
        if threshold < 0:
            self.active, self.calm_since = False, None
        elif others_pct is None:
            pass  # no evidence either way: keep the current judgement
        elif others_pct > threshold:
            self.active, self.calm_since = True, None
        elif self.active:
            if self.calm_since is None:
                self.calm_since = now
            if now - self.calm_since >= BUSY_CLEAR_S:
                self.active, self.calm_since = False, None
        return self.active


class ThermalRule:
    """Back off above max_temp; resume at or below max_temp - THERMAL_HYSTERESIS_C."""

    def __init__(self) -> None:
        self.active = False

    def update(self, temp_c: float | None, max_temp: float) -> bool:
        if temp_c is None:
            return self.active
        if self.active and temp_c <= max_temp - THERMAL_HYSTERESIS_C:
            self.active = False
        elif not self.active and temp_c > max_temp:
            self.active = True
        return self.active


@dataclass(frozen=True)
class PressureView:
    """What the pressure rule decided: a cap on the hold (None = hold the target) and why."""

    cap_bytes: int | None
    status: str | None  # None | "yielded" (hold below target for others) | "held"
    changed: bool = False  # the cap moved this step


class PressureRule:
    """Give VRAM back to processes of our own user under memory pressure; regrow later."""

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.cap: int | None = None
        self.last_yield = -math.inf

    def update(
        self,
        sample: GpuSample | None,
        own_pids: Collection[int],
        held: int,
        target: int,
        on_pressure: str,
        now: float,
    ) -> PressureView:
        if self.cap is not None and self.cap >= target:
            self.cap = None  # --vram went down below what we yielded to
        free = sample.mem_free_bytes if sample is not None else None
        if sample is None or free is None or sample.mem_total_bytes is None:
            return self._view(False)
        reserve = reserve_bytes(sample.mem_total_bytes)
        procs = sample.processes
        eaters = [p for p in procs or () if p.pid not in own_pids and (p.used_bytes or 0) > 0]
        if free < reserve:
            ours = any(p.uid == self.uid for p in eaters)
            if on_pressure == "yield" and ours and held > 0:
                give = math.ceil((reserve - free) / CHUNK_BYTES) * CHUNK_BYTES
                new_cap = max(0, min(held, target) - give)
                changed = new_cap != self.cap
                self.cap, self.last_yield = new_cap, now
                return self._view(changed)
            if self.cap is None and (eaters or procs is None):
                return PressureView(None, "held")
            return self._view(False)
        if self.cap is not None and free >= reserve + CHUNK_BYTES:
            if now - self.last_yield >= REGROW_DELAY_S:
                self.cap = self.cap + CHUNK_BYTES if self.cap + CHUNK_BYTES < target else None
                return self._view(True)
        return self._view(False)

    def _view(self, changed: bool) -> PressureView:
        return PressureView(self.cap, "yielded" if self.cap is not None else None, changed)
