"""`python -m keepgpu.worker`: one worker per GPU, started by the supervisor only.

First statements: arm PR_SET_PDEATHSIG (SIGKILL) and check that the parent is still the
supervisor that spawned us; only then import anything heavy (the engine imports torch).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _arm_pdeathsig() -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _expected_parent(argv: list[str]) -> int | None:
    try:
        return int(argv[argv.index("--supervisor-pid") + 1])
    except (ValueError, IndexError):
        return None


def main() -> None:
    _arm_pdeathsig()
    expected = _expected_parent(sys.argv)
    if expected is not None and os.getppid() != expected:
        # The supervisor died before PDEATHSIG was armed: nobody would ever stop us.
        os._exit(1)
    from keepgpu.worker.run import main as run_main

    code = run_main(sys.argv[1:])
    # The hold is released and the sockets are closed by now: skip the interpreter's teardown
    # (tens of ms of CPU per worker, which adds up when 64 workers stop at once on few cores).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
