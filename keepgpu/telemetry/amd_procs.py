"""Which processes AMD SMI's process list names, as far as this process can prove it.

AMD SMI takes pids from KFD, i.e. host pids. Never imports torch or amdsmi.
"""

from __future__ import annotations

import os

import psutil

# Processes with a KFD (ROCm compute) context. Their GFX engine time in amdsmi comes from DRM
# fdinfo, which does not see work submitted through /dev/kfd user queues: it reads ~0 however
# busy they are, so their per-process utilization is unknown, never 0.
_KFD_PROC_DIR = "/sys/class/kfd/kfd/proc"
# Inode of the initial PID namespace (PROC_PID_INIT_INO, include/linux/proc_ns.h). AMD SMI
# reports host pids; only there is a pid provably the same process as ours with that number.
_PID_NS_PATH = "/proc/self/ns/pid"
_INIT_PID_NS_INO = 0xEFFFFFFC


def pids_are_ours() -> bool:
    """True when AMD SMI's (host) pids name the same processes here: the initial PID namespace.

    In a container a host pid can equal an unrelated local pid; its owner would be a guess.
    """
    try:
        return os.stat(_PID_NS_PATH).st_ino == _INIT_PID_NS_INO
    except OSError:
        return False


def process_uid(pid: int) -> int | None:
    """Real uid of `pid`; None when it cannot be seen (gone) or not proven ours (container)."""
    if not pids_are_ours():
        return None
    try:
        return int(psutil.Process(pid).uids().real)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def kfd_pids() -> frozenset[int] | None:
    """Pids with a KFD context (ROCm compute), None when KFD's process list is unreadable."""
    try:
        names = os.listdir(_KFD_PROC_DIR)
    except OSError:
        return None
    return frozenset(int(n) for n in names if n.isdigit())
