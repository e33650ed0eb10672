"""A watched process whose end makes the supervisor release everything (`--exit-with PID`).

Used by `keepgpu.hold()` (the calling Python process) and meant for anything that starts a
keeper on behalf of a program: when that program ends — SIGKILL and the OOM killer included —
so does its keeper, through the same bounded release as SIGTERM.

No thread: a pidfd (Linux ≥ 5.3) becomes readable when the process exits and sits in the event
loop's poller. Where pidfd_open is missing, the pid is checked every CHECK_S seconds, by its
start time so that a reused pid is not mistaken for the original.
"""

from __future__ import annotations

import math
import os
from collections.abc import Container

CHECK_S = 0.5


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None when
    there is no such live process (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            rest = fh.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    if len(rest) < 20 or rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


def exists(pid: int) -> bool:
    """Whether `pid` is a live process (someone else's counts)."""
    if start_time(pid) is not None:
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: beyond pid_t, never a pid
        return False
    except PermissionError:
        return True
    return not os.path.isdir("/proc/self")  # /proc is there and had no live entry: gone


class PidWatch:
    """Watch one pid. `fd` is a pollable pidfd, or None when the loop must call `ended` on
    each tick (it then checks at most every CHECK_S seconds; see `next_check`)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        self._start = start_time(pid)
        self.next_check = -math.inf
        try:
            self.fd = os.pidfd_open(pid)
        except (AttributeError, OSError, OverflowError):  # old Python/kernel, or gone
            self.fd = None
        if self.fd is not None and start_time(pid) != self._start:
            # The pid was reused between the two looks: the pidfd is of another process.
            os.close(self.fd)
            self.fd = None
        if self.fd is not None:
            self.next_check = math.inf

    def ended(self, events: Container[int], now: float) -> bool:
        """True once the watched process has ended. `events`: the fds the poll found ready."""
        if self.fd is not None:
            return self.fd in events
        if now < self.next_check:
            return False
        self.next_check = now + CHECK_S
        if self._start is None:
            return not exists(self.pid)
        return start_time(self.pid) != self._start

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class PidSet:
    """Several watched pids (yields, a `-- CMD`), each added once. The owner registers `fd`s
    of new watches in its poller (`add` returns the new PidWatch) and calls `ended` each
    tick; ended watches leave the set, and the owner unregisters their fd, then closes them."""

    def __init__(self) -> None:
        self.watches: dict[int, PidWatch] = {}

    def add(self, pid: int) -> PidWatch | None:
        """Watch `pid`; None when it is watched already."""
        if pid in self.watches:
            return None
        watch = PidWatch(pid)
        self.watches[pid] = watch
        return watch

    def ended(self, events: Container[int], now: float) -> list[PidWatch]:
        """The watches whose process ended (removed from the set, not closed yet)."""
        out = [w for w in self.watches.values() if w.ended(events, now)]
        for watch in out:
            del self.watches[watch.pid]
        return out

    @property
    def next_check(self) -> float:
        return min((w.next_check for w in self.watches.values()), default=math.inf)

    def close(self) -> None:
        for watch in self.watches.values():
            watch.close()
        self.watches.clear()
