"""`python -m keepgpu.worker`: one worker per GPU, started by the supervisor only.

The supervisor arms PR_SET_PDEATHSIG (SIGKILL) between fork and exec (keepgpu.supervisor.procs),
so a worker never runs a line without it. First statements here: two test-only faults, then arm
it again (harmless; it also covers a worker started by hand) and check that the parent is still
the supervisor that spawned us; only then import anything heavy (the engine imports torch).
"""

from __future__ import annotations

import os
import sys


def _spawn_fault(var: str) -> str | None:
    """A test-only `KEEPGPU_FAKE_*_AT_SPAWN` value for this worker: `VALUE` for every worker or
    `ENTRY:VALUE,...` by device entry. Read before anything is imported, so that a test sees the
    worker as it is the instant the interpreter starts."""
    raw = os.environ.get(var)
    if not raw:
        return None
    entry = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    found = None
    for item in raw.split(","):
        target, sep, value = item.strip().rpartition(":")
        if not sep:
            found = found if found is not None else value
        elif target == entry:
            return value
    return found


# Test faults (see keepgpu.worker.faults): stop or exit before Python does anything else.
if _spawn_fault("KEEPGPU_FAKE_STOP_AT_SPAWN") not in (None, "", "0"):
    os.kill(os.getpid(), 19)  # SIGSTOP; the signal module is not imported yet
_EXIT_AT_SPAWN = _spawn_fault("KEEPGPU_FAKE_EXIT_AT_SPAWN")
if _EXIT_AT_SPAWN:
    os._exit(int(_EXIT_AT_SPAWN))

import ctypes  # noqa: E402 - after the spawn faults on purpose
import signal  # noqa: E402

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
