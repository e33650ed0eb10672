"""keepgpu.logsink: log lines are dropped and counted, never waited for."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepgpu import logsink
from keepgpu.logsink import PIPE_BUF, NonBlockingHandler, pieces


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("keepgpu.test", logging.INFO, __file__, 1, msg, None, None)


def _fill(write_fd: int) -> None:
    """Fill the pipe through a private non-blocking description (the test's own)."""
    fd = os.open(f"/proc/self/fd/{write_fd}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        while True:
            os.write(fd, b"x" * PIPE_BUF)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def _drain(read_fd: int) -> bytes:
    os.set_blocking(read_fd, False)
    out = b""
    try:
        while chunk := os.read(read_fd, 65536):
            out += chunk
    except BlockingIOError:
        pass
    return out


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def test_pieces_cut_at_newlines_and_never_inside_a_character() -> None:
    text = ("line %d\n" * 2000 % tuple(range(2000))).encode()
    parts = pieces(text)
    assert b"".join(parts) == text
    assert all(len(p) <= PIPE_BUF and p.endswith(b"\n") for p in parts)
    wide = ("é" * 5000).encode()  # 2 bytes each, no newline
    parts = pieces(wide)
    assert b"".join(parts) == wide
    assert all(len(p) <= PIPE_BUF for p in parts)
    for p in parts:
        p.decode("utf-8")  # each piece is whole characters


@pytest.mark.parametrize("reopen", [True, False], ids=["reopened", "poll"])
def test_a_full_pipe_drops_and_counts_lines_then_reports_them(
    pipe: tuple[int, int], reopen: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = pipe
    if not reopen:
        monkeypatch.setattr(logsink, "_reopen_nonblocking", lambda fd: None)
    handler = NonBlockingHandler(w)
    assert handler.kind == ("reopened" if reopen else "poll")
    assert os.get_blocking(w), "the shared description must stay blocking"
    _fill(w)
    for i in range(100):
        handler.emit(_record(f"lost {i}"))  # a blocking write would hang the test here
    assert handler.dropped == 100
    _drain(r)
    handler.emit(_record("back"))
    assert _drain(r) == b"100 log line(s) dropped: the log stream was full\nback\n"
    assert handler.dropped == 0
    handler.close()


def test_a_long_record_goes_out_whole_in_atomic_pieces(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler = NonBlockingHandler(w)
    msg = "\n".join(f"frame {i}" for i in range(1500))  # ~13 KB, like a traceback
    handler.emit(_record(msg))
    assert _drain(r) == (msg + "\n").encode()
    handler.close()


def test_regular_files_are_written_plainly(tmp_path: Path) -> None:
    with open(tmp_path / "log", "wb") as fh:
        handler = NonBlockingHandler(fh.fileno())
        assert handler.kind == "file"
        handler.emit(_record("hello"))
    assert (tmp_path / "log").read_bytes() == b"hello\n"
