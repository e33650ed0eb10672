"""keepgpu.supervisor.watch: a watched pid's end is seen, by pidfd or by polling."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterator

import pytest

from keepgpu.supervisor import watch
from keepgpu.supervisor.watch import CHECK_S, PidWatch


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _readable(fd: int, timeout_s: float) -> bool:
    return bool(select.select([fd], [], [], timeout_s)[0])


def test_a_pidfd_becomes_readable_when_the_process_dies(child: subprocess.Popen[bytes]) -> None:
    w = PidWatch(child.pid)
    assert w.fd is not None
    assert not _readable(w.fd, 0.2) and not w.ended({}, 0.0)
    child.kill()  # not reaped yet: a zombie has ended too
    assert _readable(w.fd, 10)
    assert w.ended({w.fd: select.POLLIN}, 0.0)
    w.close()
    assert w.fd is None


def test_without_pidfd_the_pid_is_checked_every_tick(
    child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError("pidfd_open not available")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    w = PidWatch(child.pid)
    assert w.fd is None
    assert not w.ended(set(), 100.0)
    assert w.next_check == 100.0 + CHECK_S
    child.kill()
    child.wait(10)
    assert not w.ended(set(), 100.1)  # not due yet
    assert w.ended(set(), 100.0 + CHECK_S)


def test_a_reused_pid_is_not_the_watched_process(
    child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pidfd_open", lambda pid: (_ for _ in ()).throw(OSError()))
    w = PidWatch(child.pid)
    real = watch.start_time
    monkeypatch.setattr(watch, "start_time", lambda pid: (real(pid) or 0) + 1)  # another process
    assert w.ended(set(), 0.0)


def test_a_pid_that_is_gone_ends_at_once() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    assert not watch.exists(proc.pid)
    w = PidWatch(proc.pid)
    assert w.ended(set(), 0.0)
    assert watch.exists(os.getpid())
