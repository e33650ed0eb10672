"""Supervisor <-> worker messages on the workers socket (ROUTER in the supervisor, DEALER in each
worker with identity `<gpu>/<incarnation>`). One JSON frame per message, field `t` is the type.

worker -> supervisor: `ready`, `hb` (heartbeat with a progress counter), `error` (last words),
`stopped` (memory released after STOP).
supervisor -> worker: `stop`, `pause`, `resume`, `set`.
"""

from __future__ import annotations

import json
from typing import Any

WORKER_TYPES = ("ready", "hb", "error", "stopped")
SUPERVISOR_TYPES = ("stop", "pause", "resume", "set")
MAX_WORKER_MESSAGE = 64 * 1024


def identity(gpu: int, incarnation: int) -> bytes:
    return f"{gpu}/{incarnation}".encode()


def parse_identity(raw: bytes) -> tuple[int, int] | None:
    try:
        gpu, inc = raw.decode("ascii").split("/")
        return int(gpu), int(inc)
    except (UnicodeDecodeError, ValueError):
        return None


def encode(t: str, **fields: Any) -> bytes:
    return json.dumps({"t": t, **fields}, separators=(",", ":")).encode()


def decode(frame: bytes, allowed: tuple[str, ...]) -> dict[str, Any] | None:
    """The message as a dict, or None when it is malformed or of a type not in `allowed`."""
    if len(frame) > MAX_WORKER_MESSAGE:
        return None
    try:
        obj = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("t") not in allowed:
        return None
    return obj
