"""The command of `keepgpu-supervise -- CMD` (and the shared rules of `keepgpu-ctl yield`).

CMD is spawned by the supervisor's main thread, in the supervisor's own process group (so a
terminal's Ctrl-C and job control reach it as usual), with the supervisor's stdin/stdout and its
original stderr. Its exit code becomes the supervisor's: 128+N when it died of signal N, 127 when
it cannot be found, 126 when it cannot be executed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

log = logging.getLogger("keepgpu.supervisor")

EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


def exit_code(returncode: int) -> int:
    """A shell's view of a child's end: the code, or 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def spawn_failure(exc: OSError) -> int:
    """The shell's exit code for a CMD that could not be executed."""
    return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError | NotADirectoryError) \
        else EXIT_NOT_EXECUTABLE


def terminal_sent(signum: int) -> bool:
    """Whether a SIGINT/SIGQUIT most likely came from our terminal, which delivers it to the
    whole foreground process group (CMD included): forwarding it would deliver it twice."""
    if signum not in (signal.SIGINT, signal.SIGQUIT):
        return False
    for fd in (0, 2):
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


class Command:
    """One CMD: started once, its end seen through SIGCHLD (poll), its code kept."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str],
                 stderr: int | None = None) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.stderr = stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self.code: int | None = None  # set once it has ended (or could not start)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.code is None

    @property
    def pid(self) -> int | None:
        """CMD's pid while it runs."""
        return self.proc.pid if self.proc is not None and self.code is None else None

    @property
    def started(self) -> bool:
        return self.proc is not None or self.code is not None

    def start(self) -> None:
        try:
            self.proc = subprocess.Popen(self.argv, env=self.env, stderr=self.stderr)
        except OSError as exc:
            self.code = spawn_failure(exc)
            log.error("cannot run %s: %s (exit %d)", self.argv[0], exc.strerror, self.code)
            return
        log.info("command pid %d started: %s", self.proc.pid, " ".join(self.argv)[:200])

    def poll(self) -> bool:
        """True once, when CMD has just ended."""
        if self.proc is None or self.code is not None:
            return False
        rc = self.proc.poll()
        if rc is None:
            return False
        self.code = exit_code(rc)
        log.info("command pid %d exited %d: releasing every GPU", self.proc.pid, self.code)
        return True

    def forward(self, signum: int) -> None:
        """Pass a signal sent to keepgpu on to CMD (not one the terminal gave CMD already)."""
        if self.proc is None or self.code is not None or terminal_sent(signum):
            return
        log.info("passing %s on to command pid %d", signal.Signals(signum).name, self.proc.pid)
        try:
            os.kill(self.proc.pid, signum)
        except ProcessLookupError:
            pass  # it has just ended; poll() reports it
