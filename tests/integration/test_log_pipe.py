"""A keeper never blocks on its own logging: stderr a pipe that nobody reads (issue 9, item 7)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import termios
import time
import uuid
from pathlib import Path

from kgtest import SUPERVISE, alive, proc_key, wait_until

from keepgpu.client import Client
from keepgpu.logsink import PIPE_BUF

F_GETPIPE_SZ = 1032  # fcntl.F_GETPIPE_SZ exists only from Python 3.10 on some builds


def _queued(fd: int) -> int:
    """Bytes waiting in the pipe (FIONREAD)."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def _drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def _cycle(client: Client) -> None:
    # A stuck supervisor does not answer within 5 s: NoSupervisor fails the test.
    client.call("pause", timeout=5.0)
    client.call("resume", timeout=5.0)


def test_supervisor_and_workers_keep_serving_with_a_full_stderr_pipe(
    runtime_dir: Path, base_env: dict[str, str]
) -> None:
    read_fd, write_fd = os.pipe()
    name = f"p{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [*SUPERVISE, "--name", name, "--gpus", "0,1", "-v", "--heartbeat", "0.2",
         "--hang-timeout", "3"],
        env=base_env, stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
    )
    os.close(write_fd)
    client = Client(f"ipc://{runtime_dir}/{name}.ctl", timeout=5.0)
    workers: list[tuple[int, float]] = []
    try:
        gpus = wait_until(lambda: _holding(client), 20)
        workers = [k for k in (proc_key(g["pid"]) for g in gpus) if k]
        capacity = fcntl.fcntl(read_fd, F_GETPIPE_SZ)
        cycles = 0
        while _queued(read_fd) < capacity - PIPE_BUF and cycles < 3000:
            _cycle(client)
            cycles += 1
        assert _queued(read_fd) >= capacity - PIPE_BUF, "the pipe never filled up"
        for _ in range(30):  # well past the point where a blocking write would hang
            _cycle(client)
        for _ in range(3):  # slow cycles: each worker logs its own state change too
            client.call("pause", timeout=5.0)
            wait_until(lambda: _reasons(client) == {"paused"}, 5)
            client.call("resume", timeout=5.0)
            wait_until(lambda: _reasons(client) == {None}, 5)
        time.sleep(1.0)  # workers keep heartbeating into the full pipe meanwhile
        started = time.monotonic()
        gpus = client.call("status", timeout=2.0)["gpus"]
        assert time.monotonic() - started < 2.0
        assert [g["state"] for g in gpus] == ["holding", "holding"]
        assert all(g["heartbeat_age_s"] is not None and g["heartbeat_age_s"] < 1.5 for g in gpus)
        assert all(g["restarts"] == 0 for g in gpus)
        assert [proc_key(g["pid"]) for g in gpus] == workers
        # Once the pipe is read again, the lost lines are reported.
        os.set_blocking(read_fd, False)
        _drain(read_fd)
        _cycle(client)
        seen = wait_until(lambda: _drain(read_fd), 5)
        assert b"log line(s) dropped" in seen
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        os.close(read_fd)  # unblocks a writer stuck on it (EPIPE), so the wait is bounded
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for key in workers:
            if alive(key):
                os.kill(key[0], signal.SIGKILL)
    assert proc.returncode == 0


def _holding(client: Client) -> list[dict[str, object]] | None:
    try:
        gpus = client.call("status", timeout=1.0)["gpus"]
    except Exception:  # noqa: BLE001 - not up yet
        return None
    return gpus if gpus and all(g["state"] == "holding" for g in gpus) else None


def _reasons(client: Client) -> set[object]:
    return {g["reason"] for g in client.call("status", timeout=2.0)["gpus"]}
