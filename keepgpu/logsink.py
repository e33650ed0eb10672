"""A log handler that never blocks its process, used by the supervisor and by every worker.

A keeper whose stderr is a pipe nobody reads (`keepgpu-supervise 2>&1 | stuck`, or a parent that
never drains it) used to block in write() once ~64 KiB of log filled the pipe: the control
socket stopped answering and the workers stopped their activity. Here a line that cannot be
written at once is dropped and counted, and "N log line(s) dropped" is written as soon as the
stream takes writes again.

How a write is kept from blocking, by kind of stream:
- pipe or terminal: the handler opens its own file description of it (`/proc/self/fd/N`) with
  O_NONBLOCK. The inherited description is shared with the user's shell, so its flags are left
  alone. A write of at most PIPE_BUF bytes to a non-blocking pipe is all-or-EAGAIN.
- socket (e.g. the journal's stdout stream): send() with MSG_DONTWAIT on a duplicate.
- regular file: written as it is (a file does not fill up the way a pipe does).
- anything else, or a reopen that fails (no /proc): a zero-timeout poll(POLLOUT) before each
  write. That cannot see another process fill the pipe between the poll and the write, which
  is why the reopen comes first.
Records are written in pieces of at most PIPE_BUF bytes, each in one os.write. A record cut
short (a full disk takes part of a write) is ended with a newline before the next write, so
the next line is never glued to half of it.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
from typing import Any

from keepgpu.logfmt import plain_record

PIPE_BUF = 4096  # POSIX minimum and Linux's value: pipe writes up to this size are atomic


def pieces(data: bytes, size: int = PIPE_BUF) -> list[bytes]:
    """Split `data` into chunks of at most `size` bytes, at newlines where possible and never
    inside a UTF-8 sequence."""
    out: list[bytes] = []
    while len(data) > size:
        cut = data.rfind(b"\n", 0, size) + 1
        if cut == 0:
            cut = size
            while cut > 1 and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
                cut -= 1
        out.append(data[:cut])
        data = data[cut:]
    if data:
        out.append(data)
    return out


class NonBlockingHandler(logging.Handler):
    """Write formatted records to file descriptor `fd` without ever blocking (see module doc).

    `dropped` counts records not written since the last successful write.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.dropped = 0
        self._fd = fd
        self._own_fd: int | None = None
        self._sock: socket.socket | None = None
        self._poll_first = False
        self._torn = False  # a write stopped mid-line (ENOSPC on a file): newline first
        self._open(fd)

    def _open(self, fd: int) -> None:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:  # a closed fd: poll() reports it unwritable, every line is dropped
            self._poll_first = True
            return
        if stat.S_ISREG(mode):
            return
        if stat.S_ISSOCK(mode):
            try:
                self._sock = socket.socket(fileno=os.dup(fd))
                return
            except OSError:
                pass
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            own = _reopen_nonblocking(fd)
            if own is not None:
                self._own_fd = self._fd = own
                return
        self._poll_first = True

    @property
    def kind(self) -> str:
        """How writes are kept from blocking: reopened, socket, file or poll (for tests/logs)."""
        if self._own_fd is not None:
            return "reopened"
        if self._sock is not None:
            return "socket"
        return "poll" if self._poll_first else "file"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - logging's own convention for a bad record
            self.handleError(record)
            return
        if self.dropped:
            if not self._write(self._dropped_note().encode("utf-8", "replace")):
                self.dropped += 1
                return
            self.dropped = 0
        if not self._write(text.encode("utf-8", "replace")):
            self.dropped += 1

    def _dropped_note(self) -> str:
        # Formatted like every other line, so that a json log stays one object per line.
        text = f"{self.dropped} log line(s) dropped: the log stream was full"
        try:
            return self.format(plain_record(text, event="log-dropped",
                                            dropped=self.dropped)) + "\n"
        except Exception:  # noqa: BLE001 - the note must not fail where the record did not
            return f"keepgpu: {text}\n"

    def _write(self, data: bytes) -> bool:
        if self._torn:
            # End the torn line first, or the next record would be glued to its first half.
            if self._send(b"\n") != 1:
                return False
            self._torn = False
        for i, piece in enumerate(pieces(data)):
            sent = self._send(piece)
            if sent != len(piece):
                # Part of this record is out (a short write on a full disk, or earlier pieces).
                self._torn = sent > 0 or i > 0
                return False
        return True

    def _send(self, piece: bytes) -> int:
        """Bytes of `piece` written at once; 0 when none could be."""
        if self._poll_first and not _writable(self._fd):
            return 0
        try:
            if self._sock is not None:
                return self._sock.send(piece, socket.MSG_DONTWAIT)
            return os.write(self._fd, piece)
        except OSError:  # EAGAIN (BlockingIOError), EPIPE, ENOSPC...: drop, never raise
            return 0

    def close(self) -> None:
        if self._own_fd is not None:
            os.close(self._own_fd)
            self._own_fd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super().close()


def _reopen_nonblocking(fd: int) -> int | None:
    """A new, private, non-blocking description of the pipe or terminal behind `fd`."""
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_APPEND
    try:
        own = os.open(f"/proc/self/fd/{fd}", flags)
    except OSError:  # no /proc, or a pipe whose reader is gone (ENXIO)
        return None
    before, after = os.fstat(fd), os.fstat(own)
    if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino):
        os.close(own)
        return None
    return own


def _writable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        events = poller.poll(0)
    except OSError:
        return False
    return any(ev & select.POLLOUT and not ev & (select.POLLERR | select.POLLHUP)
               for _, ev in events)


def handler_for(stream: Any) -> logging.Handler:
    """A NonBlockingHandler on `stream`'s file descriptor; a plain StreamHandler for a stream
    without one (io.StringIO in tests)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return logging.StreamHandler(stream)
    stream.flush()
    return NonBlockingHandler(fd)
