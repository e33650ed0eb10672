"""Restart policy: exponential backoff with jitter and a restart-intensity limit (OTP's MaxR/MaxT).

Pure logic on an injected monotonic time; no processes here.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    """Per-slot restart bookkeeping.

    delay: `initial_s` doubling per consecutive crash up to `max_s`, ±`jitter` fraction; reset to
    `initial_s` after a run that stayed up `healthy_reset_s`. More than `max_restarts` restarts
    within `window_s` means give up (the slot becomes `fatal`).
    """

    initial_s: float = 1.0
    max_s: float = 60.0
    jitter: float = 0.10
    healthy_reset_s: float = 60.0
    max_restarts: int = 5
    window_s: float = 300.0
    rng: random.Random = field(default_factory=random.Random)
    _next_delay: float = field(init=False, default=0.0)
    _history: deque[float] = field(init=False, default_factory=deque)

    def __post_init__(self) -> None:
        self._next_delay = self.initial_s

    @property
    def recent(self) -> int:
        return len(self._history)

    def in_window(self, now: float) -> int:
        """Restarts recorded within the last `window_s` seconds before `now` (read-only)."""
        return sum(1 for t in self._history if now - t <= self.window_s)

    def reset(self) -> None:
        """Forget history (an operator's `start` revives a fatal slot with a clean slate)."""
        self._history.clear()
        self._next_delay = self.initial_s

    def on_crash(self, now: float, up_for_s: float) -> float | None:
        """Record a crash at `now` after running `up_for_s`; the delay before the next start, or
        None when the restart intensity is exceeded (give up)."""
        while self._history and now - self._history[0] > self.window_s:
            self._history.popleft()
        if up_for_s >= self.healthy_reset_s:
            self._next_delay = self.initial_s
        if len(self._history) >= self.max_restarts:
            return None
        self._history.append(now)
        base = self._next_delay
        self._next_delay = min(self.max_s, base * 2)
        spread = base * self.jitter
        return max(0.0, base + self.rng.uniform(-spread, spread))
