"""`keepgpu-supervise --detach`: daemonize, then tell the starting shell how the start went.

The original process waits (bounded) on a pipe for JSON lines from the daemon: progress lines
(`{"progress": {...}}`, one per GPU as it holds, fails a start or becomes fatal), then one final
line, written once every selected GPU holds or has failed, or when the daemon gives up early
(lock, bind). Progress is printed on stderr (stdout keeps the one summary line scripts read):
failures at once, holding GPUs only once the start has taken more than PROGRESS_AFTER_S.
"""

from __future__ import annotations

import errno
import json
import os
import select
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from keepgpu.cli.common import EXIT_ALL_FATAL, EXIT_CONFIG, EXIT_FAILED, Exit, fail

#: A start that ends within this long prints its summary line alone.
PROGRESS_AFTER_S = 1.0
_LIVE = ("holding", "backoff")
_FAILED = ("fatal", "unkillable")


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
    # Never block the daemon on a shell that stopped reading: a line that does not fit is lost.
    os.set_blocking(write_fd, False)
    Reporter.fd = write_fd
    return None


class Reporter:
    """The daemon's side of the pipe: progress lines, then one final report."""

    fd: int | None = None
    sent: dict[int, tuple[int, str]] = {}  # gpu -> (incarnation, state) last told

    @classmethod
    def _write(cls, data: dict[str, Any]) -> None:
        if cls.fd is None:
            return
        try:
            os.write(cls.fd, (json.dumps(data) + "\n").encode())
        except OSError:  # EAGAIN (full), EPIPE (the shell is gone): the daemon goes on
            pass

    @classmethod
    def report(cls, data: dict[str, Any]) -> None:
        """The final line; the pipe is closed after it."""
        if cls.fd is None:
            return
        try:
            cls._write(data)
        finally:
            os.close(cls.fd)
            cls.fd = None

    @classmethod
    def progress(cls, sup: Any) -> None:
        """Tell the shell about each GPU that now holds, failed a start or is fatal (called
        by the supervisor's loop until every GPU holds or failed; `sup` is its Supervisor)."""
        if cls.fd is None:
            return
        now = sup.clock()
        for slot in sup.slots.values():
            state = "holding" if slot.state in _LIVE else slot.state
            if state not in ("holding", "restarting", *_FAILED):
                continue
            if cls.sent.get(slot.gpu) == (slot.incarnation, state):
                continue
            cls.sent[slot.gpu] = (slot.incarnation, state)
            delay = None if slot.restart_at is None else max(0.0, slot.restart_at - now)
            cls._write({"progress": {
                "gpu": slot.gpu, "state": state, "reason": slot.reason, "pid": slot.pid,
                "error": slot.error, "restarts": slot.restarts,
                "restart_in_s": None if delay is None else round(delay, 2),
            }})


def progress_line(p: dict[str, Any]) -> str:
    """One line for the shell about one GPU's start."""
    gpu, state, error = p.get("gpu"), p.get("state"), p.get("error")
    if state == "holding":
        return f"GPU {gpu}: holding (pid {p.get('pid')})"
    if state == "restarting":
        when = p.get("restart_in_s")
        again = f"; restart {p.get('restarts')} in {when:g}s" if isinstance(when, (float, int)) \
            else "; restarting"
        return f"GPU {gpu}: start failed: {error or 'worker exited'}{again}"
    reason = f" ({p['reason']})" if p.get("reason") else ""
    return f"GPU {gpu}: {state}{reason}: {error or 'no reason given'}"


def _echo_err(line: str) -> None:
    click.echo(line, err=True)


def wait_for_daemon(read_fd: int, timeout_s: float, log_path: Path,
                    show: Callable[[str], None] = _echo_err) -> tuple[int, str]:
    """(exit code, message) from the daemon's report, waiting at most `timeout_s`; progress
    lines go to `show` as they come (holding ones once PROGRESS_AFTER_S have passed)."""
    start = time.monotonic()
    deadline = start + timeout_s
    buf = b""
    held: list[str] | None = []  # holding lines kept back while the start is quick; None: live
    data: dict[str, Any] | None = None
    try:
        while data is None:
            now = time.monotonic()
            if held is not None and now - start >= PROGRESS_AFTER_S:
                for line in held:
                    show(line)
                held = None
            left = deadline - now
            if left <= 0:
                raise Exit(EXIT_FAILED, f"no report from the daemon within {timeout_s:g}s; "
                           f"see {log_path}")
            wake = left if held is None else min(left, start + PROGRESS_AFTER_S - now)
            ready, _, _ = select.select([read_fd], [], [], max(0.0, wake))
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                raise Exit(EXIT_FAILED, f"the daemon exited during start; see {log_path}")
            buf += chunk
            while b"\n" in buf and data is None:
                raw, buf = buf.split(b"\n", 1)
                msg = json.loads(raw)
                if not isinstance(msg.get("progress"), dict):
                    data = msg
                    continue
                line = progress_line(msg["progress"])
                if held is not None and msg["progress"].get("state") == "holding":
                    held.append(line)
                else:
                    show(line)
    finally:
        os.close(read_fd)
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
