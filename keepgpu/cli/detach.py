"""`keepgpu-supervise --detach`: daemonize, then tell the starting shell how the start went.

The original process waits (bounded) on a pipe for one JSON line from the daemon: written once
every selected GPU holds or has failed, or when the daemon gives up early (lock, bind).
"""

from __future__ import annotations

import errno
import json
import os
import select
import stat
import time
from pathlib import Path
from typing import Any

from keepgpu.cli.common import EXIT_ALL_FATAL, EXIT_CONFIG, EXIT_FAILED, Exit, fail


def open_log_file(path: Path) -> tuple[Path, int]:
    """(absolute path, fd open for appending) of a --log-file; exit 78 when it cannot be opened
    or is not a regular file. Opened without blocking (a FIFO nobody reads would hang the open
    forever) and before any fork, so a refused start leaves nothing running."""
    path = path.expanduser().absolute()
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        why = "a FIFO that nobody reads" if exc.errno == errno.ENXIO else exc.strerror
        fail(EXIT_CONFIG, f"cannot open --log-file {path}: {why}; give a regular file")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        fail(EXIT_CONFIG, f"cannot use --log-file {path}: not a regular file")
    os.set_blocking(fd, True)
    return path, fd


def daemonize(log_fd: int) -> int | None:
    """Fork twice (new session). In the original process return the read end of the report
    pipe; in the daemon return None after pointing stdio at `log_fd` (see open_log_file)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        os.close(log_fd)
        os.waitpid(pid, 0)
        return read_fd
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    Reporter.fd = write_fd
    return None


class Reporter:
    """The daemon's side of the pipe; writes at most once."""

    fd: int | None = None

    @classmethod
    def report(cls, data: dict[str, Any]) -> None:
        if cls.fd is None:
            return
        try:
            os.write(cls.fd, (json.dumps(data) + "\n").encode())
        except OSError:
            pass
        finally:
            os.close(cls.fd)
            cls.fd = None


def wait_for_daemon(read_fd: int, timeout_s: float, log_path: Path) -> tuple[int, str]:
    """(exit code, message) from the daemon's report, waiting at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    buf = b""
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Exit(EXIT_FAILED, f"no report from the daemon within {timeout_s:g}s; "
                           f"see {log_path}")
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                raise Exit(EXIT_FAILED, f"the daemon exited during start; see {log_path}")
            buf += chunk
    finally:
        os.close(read_fd)
    data = json.loads(buf.split(b"\n", 1)[0])
    if "error" in data:
        raise Exit(int(data.get("code", EXIT_FAILED)), str(data["error"]))
    states = data.get("states", [])
    holding = sum(s in ("holding", "backoff") for s in states)
    line = (
        f"keepgpu supervisor {data['name']!r} pid {data['pid']}: {holding}/{len(states)} GPU(s) "
        f"holding; control {data['endpoint']}; log {log_path}"
    )
    if states and holding == 0:
        return EXIT_ALL_FATAL, line
    return (0 if holding == len(states) else EXIT_FAILED), line
