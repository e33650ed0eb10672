"""The closed-loop duty controller and the quiet probe. Pure: no I/O, no clock of its own.

`DutyController` steers the fraction of wall time spent in pulses so that the device's NVML
`utilization.gpu` sits at `--target-util`. The law is a clamped integral step:

    duty <- clamp(duty + GAIN_PER_S * dt * (target - util) / 100,  MIN_DUTY, MAX_DUTY)

with `dt` the seconds since the previous update (capped at MAX_DT_S), no step inside a
±DEADBAND_PCT band, and no step while the measurement is not of our own making (backoff, a quiet
probe, the settle time after either). The integrator state IS the clamped duty, so it cannot wind
up. The first duty is the feed-forward `target / 100` (a one-block spin kernel reads as busy for
exactly the time it runs, so the plant gain is about 1); a new target scales the learned duty.

`QuietProbe` measures the other processes' load where per-process utilization is unavailable:
it asks for no pulses for PROBE_S seconds, then takes the device utilization as theirs.
"""

from __future__ import annotations

import math

MIN_DUTY = 0.01
MAX_DUTY = 1.0
#: Duty change per second per unit of error (fraction): 0.25 per 0.5 s control tick. Stable
#: with a plant gain up to ~2 and the 1-2 tick lag of NVML's sample window.
GAIN_PER_S = 0.5
DEADBAND_PCT = 1.0
MAX_DT_S = 1.0
#: At full duty with utilization still below the target this long: the target is out of reach
#: (pulses come out shorter than asked, or the monitor reads less than our busy time).
UNREACHABLE_S = 3.0

#: Seconds without pulses that make up one quiet probe: longer than NVML's sample window
#: (1/6 s to 1 s), so the reading at its end holds none of our pulses.
PROBE_S = 1.2
#: A probe is taken this often even without suspicion (load hidden by overlap with ours).
PROBE_EVERY_S = 30.0
#: At least this long between two probes, whatever the suspicion.
PROBE_MIN_GAP_S = 5.0
#: The first probe after start, once our own pulses have shaped a few NVML windows.
PROBE_FIRST_S = 2.0
#: Bounds of the learned plant gain, and the least duty of ours it is learned from.
MIN_GAIN = 0.5
MAX_GAIN = 4.0
MIN_GAIN_DUTY = 0.02


def clamp_duty(duty: float) -> float:
    return max(MIN_DUTY, min(MAX_DUTY, duty))


class DutyController:
    """Integral controller of the pulse duty (fraction 0..1) towards a device utilization (%)."""

    def __init__(self, target_pct: float) -> None:
        self.target_pct = target_pct
        self.duty = clamp_duty(target_pct / 100.0)
        self._last: float | None = None
        self._short_since: float | None = None  # saturated at MAX_DUTY below the target

    def reachable(self, now: float) -> bool:
        """False once the duty has sat at MAX_DUTY with utilization below the target (beyond
        the deadband) for UNREACHABLE_S: the controller cannot do more (status
        `target_reachable`)."""
        return self._short_since is None or now - self._short_since < UNREACHABLE_S

    def retarget(self, target_pct: float) -> None:
        """A new `--target-util`: keep the learned plant gain by scaling the duty."""
        if target_pct == self.target_pct:
            return
        if self.target_pct > 0:
            self.duty = clamp_duty(self.duty * target_pct / self.target_pct)
        else:
            self.duty = clamp_duty(target_pct / 100.0)
        self.target_pct = target_pct
        self._short_since = None  # judged afresh against the new target

    def hold(self, now: float) -> None:
        """Do not integrate over the time up to `now` (the measurement is not ours to steer)."""
        self._last = now

    def update(self, util_pct: float | None, now: float) -> float:
        """One control step with the device utilization measured now; returns the new duty.

        An unknown utilization keeps the duty (missing telemetry never stops the pulses).
        """
        dt = 0.0 if self._last is None else min(MAX_DT_S, max(0.0, now - self._last))
        self._last = now
        if util_pct is None or math.isnan(util_pct):
            return self.duty
        error = self.target_pct - util_pct
        if abs(error) > DEADBAND_PCT:
            self.duty = clamp_duty(self.duty + GAIN_PER_S * dt * error / 100.0)
        if self.duty >= MAX_DUTY and error > DEADBAND_PCT:
            if self._short_since is None:
                self._short_since = now
        else:
            self._short_since = None
        return self.duty


class QuietProbe:
    """The others' load (%) where the driver cannot attribute load per process.

    Without pulses of ours the device utilization is all theirs: a probe skips pulses for
    PROBE_S, every PROBE_EVERY_S and sooner (PROBE_MIN_GAP_S) when the device reads clearly
    above what our own duty explains. Any backoff longer than the settle time counts as a
    probe. Right after a probe the plant gain (utilization points per duty point of ours) is
    learned, so that suspicion still works where NVML reads our pulses as more or less than
    their wall time.
    """

    def __init__(self, now: float) -> None:
        self.started: float | None = None
        self.next_at = now + PROBE_FIRST_S
        self.last_end = -math.inf
        self.others_pct: float | None = None
        self.gain = 1.0
        self._learn = False

    @property
    def active(self) -> bool:
        return self.started is not None

    def defer(self, now: float) -> None:
        """Per-process attribution works: no probe is needed for now."""
        self.started = None
        self.next_at = now + PROBE_EVERY_S

    def _measured(self, util_pct: float, now: float) -> None:
        self.others_pct = util_pct
        self.last_end = now
        self.next_at = max(self.next_at, now + PROBE_EVERY_S)
        self._learn = True

    def update(
        self,
        util_pct: float | None,
        own_duty: float,
        threshold: float,
        quiet_for: float | None,
        active_for: float | None,
        now: float,
    ) -> bool:
        """Advance by one reading; returns True while pulses must be skipped for a probe.

        `quiet_for`/`active_for`: seconds since our pulses stopped/started (None if not).
        """
        if self.started is not None:
            if now - self.started < PROBE_S:
                return True
            self.started = None
            self.next_at = now + PROBE_EVERY_S
            if util_pct is not None:
                self._measured(util_pct, now)
            return False
        if util_pct is None:
            return False
        if quiet_for is not None and quiet_for >= PROBE_S:
            self._measured(util_pct, now)  # a backoff is a probe for free
            return False
        settled = active_for is not None and active_for >= PROBE_S
        self._learn_gain(util_pct, own_duty, settled)
        if threshold < 0:
            return False
        suspicious = util_pct - self.gain * own_duty * 100.0 > threshold
        if now >= self.next_at or (suspicious and now - self.last_end >= PROBE_MIN_GAP_S):
            self.started = now
            return True
        return False

    def _learn_gain(self, util_pct: float, own_duty: float, settled: bool) -> None:
        if not (self._learn and settled and own_duty >= MIN_GAIN_DUTY):
            return
        self._learn = False
        observed = (util_pct - (self.others_pct or 0.0)) / (own_duty * 100.0)
        self.gain = max(MIN_GAIN, min(MAX_GAIN, 0.5 * self.gain + 0.5 * observed))
