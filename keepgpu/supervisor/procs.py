"""Spawning and killing worker processes (one process group each). Never imports torch."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any

# Variables that would let a worker see more than its one device.
_ROCM_HIDE = ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL")


def worker_env(base: Mapping[str, str], vendor: str, entry: str) -> dict[str, str]:
    """The child's environment with exactly one device visible.

    vendor "nvidia": CUDA_VISIBLE_DEVICES=<entry>; "amd": ROCR_VISIBLE_DEVICES=<entry> with the
    HIP/CUDA lists removed; "cpu": every GPU hidden; "none" (mps): unchanged.
    CUDA_DEVICE_ORDER is kept as inherited.
    """
    env = dict(base)
    if vendor == "nvidia":
        env["CUDA_VISIBLE_DEVICES"] = entry
    elif vendor == "amd":
        env["ROCR_VISIBLE_DEVICES"] = entry
        for key in _ROCM_HIDE:
            env.pop(key, None)
    elif vendor == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["ROCR_VISIBLE_DEVICES"] = ""
        env["HIP_VISIBLE_DEVICES"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    return env


_PR_SET_PDEATHSIG = 1


@functools.cache
def _resolve_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once in the parent: the child between fork and exec must not
    load libraries or allocate more than it has to (other threads' locks are frozen there)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def _child_setup(parent: int) -> Callable[[], None] | None:
    """The preexec_fn: arm PR_SET_PDEATHSIG(SIGKILL) before the worker's interpreter exists,
    then make sure the parent did not die before it was armed (the child would be reparented
    and nothing would ever kill it). Without this a worker stopped before its own first
    statement (SIGSTOP, a frozen cgroup, a slow disk) outlives a SIGKILLed supervisor."""
    prctl = _resolve_prctl()
    if prctl is None:
        return None
    sigkill = int(signal.SIGKILL)

    def setup() -> None:
        if prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)

    return setup


def spawn_worker(
    *,
    gpu: int,
    incarnation: int,
    endpoint: str,
    settings: dict[str, Any],
    env: dict[str, str],
    stderr: IO[Any] | int | None,
) -> subprocess.Popen[bytes]:
    """Start `python -m keepgpu.worker` in its own session (and so its own process group)."""
    argv = [
        sys.executable,
        "-m",
        "keepgpu.worker",
        "--gpu",
        str(gpu),
        "--incarnation",
        str(incarnation),
        "--endpoint",
        endpoint,
        "--supervisor-pid",
        str(os.getpid()),
        "--settings",
        json.dumps(settings, separators=(",", ":")),
    ]
    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        close_fds=True,
        start_new_session=True,
        preexec_fn=_child_setup(os.getpid()),
    )


def signal_pid(pid: int, sig: int) -> bool:
    """Send `sig` to one process; False when it is already gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def kill_group(pid: int) -> None:
    """SIGKILL the worker's whole process group (its pgid is its pid: own session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        signal_pid(pid, signal.SIGKILL)


def proc_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid` (e.g. 'D' for uninterruptible sleep), if readable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    rest = data.rsplit(")", 1)[-1].split()
    return rest[0] if rest else None


def describe_exit(returncode: int) -> dict[str, Any]:
    """`last_exit` for status: {"code": N} or {"signal": "SIGKILL"}."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return {"signal": name}
    return {"code": returncode}
