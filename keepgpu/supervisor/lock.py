"""Single-instance lock: a flock on `<name>.lock` held for the supervisor's life.

ZeroMQ lets a second bind on the same ipc path succeed silently and steal new clients, so the
lock is taken BEFORE any bind; once we hold it, socket files left by a dead supervisor are stale
and are removed.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from keepgpu.protocol.runtime import Paths


class AlreadyRunning(Exception):
    """Another live supervisor holds the name."""


class InstanceLock:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = read_pid(self.paths.pidfile)
            who = f" (pid {pid})" if pid else ""
            raise AlreadyRunning(
                f"a keepgpu supervisor named {self.paths.name!r} is already running{who}; "
                "use --name to run another"
            ) from None
        self._fd = fd
        for stale in (self.paths.control, self.paths.workers):
            try:
                stale.unlink()
            except FileNotFoundError:
                pass
        tmp = self.paths.pidfile.with_suffix(".pid.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.paths.pidfile)

    def release(self) -> None:
        """Remove our files, then drop the lock (a successor may start right after)."""
        if self._fd is None:
            return
        for path in (self.paths.control, self.paths.workers, self.paths.pidfile):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
