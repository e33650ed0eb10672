"""Control protocol v1: request validation and reply envelopes (see docs/protocol.md).

Request: one UTF-8 JSON frame `{"v":1,"id":<any>,"cmd":"<name>","args":{...}}`.
Reply:   `{"v":1,"id":<same>,"ok":true,"result":{...}}` or
         `{"v":1,"id":<same>,"ok":false,"error":{"code":"...","message":"..."}}`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keepgpu.protocol.units import UnitError, parse_vram

VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
#: Longest duration accepted anywhere (pause `seconds`, CLI timeouts): 30 days. A bound keeps
#: deadlines representable for poll()/select() (which overflow on inf or 1e300).
MAX_SECONDS = 30 * 24 * 3600

MODES = ("duty", "sm", "compute", "pstate")
ERROR_CODES = (
    "bad_request",
    "unknown_command",
    "invalid_argument",
    "not_found",
    "conflict",
    "internal",
)

GpuRef = int | str


class ProtocolError(Exception):
    """A request that cannot be served; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)
    id: Any = None


def _short(value: Any) -> str:
    """A value for an error message, cut short (a 4000-digit number stays readable)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _gpus(value: Any) -> list[GpuRef]:
    if not isinstance(value, list) or not value:
        raise ProtocolError("invalid_argument", "gpus must be a non-empty list of ids")
    out: list[GpuRef] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise ProtocolError("invalid_argument", f"gpu id must be int or string: {item!r}")
        if isinstance(item, int) and item < 0:
            raise ProtocolError("invalid_argument", f"gpu id must not be negative: {_short(item)}")
        if isinstance(item, str) and not (0 < len(item) <= 128):
            raise ProtocolError("invalid_argument", "gpu id string must be 1-128 characters")
        if item in out:
            raise ProtocolError("invalid_argument", f"duplicate gpu id: {item!r}")
        out.append(item)
    return out


def _in_range(value: Any, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError("invalid_argument", f"{name} must be a number")
    # Compare before float(): a 400-digit int compares exactly but float() would overflow.
    inside = (lo < value if lo_open else lo <= value) and value <= hi
    if not inside or (isinstance(value, float) and not math.isfinite(value)):
        bounds = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ProtocolError("invalid_argument", f"{name} must be in {bounds}: {_short(value)}")
    return float(value)


def _number(lo: float, hi: float, name: str) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        return _in_range(value, name, lo, hi)

    return check


def _seconds(value: Any) -> float:
    return _in_range(value, "seconds", 0, MAX_SECONDS, lo_open=True)


def _pid(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
        raise ProtocolError("invalid_argument", f"pid must be a process id: {_short(value)}")
    return value


def _max_hold(value: Any) -> float | None:
    """Seconds from now until the keeper releases everything and exits; null: no limit."""
    if value is None:
        return None
    return _in_range(value, "max_hold", 0, MAX_SECONDS, lo_open=True)


def _vram(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ProtocolError("invalid_argument", "vram must be a string like '1GiB'/'20%' or bytes")
    try:
        return parse_vram(value).to_wire()
    except UnitError as exc:
        raise ProtocolError("invalid_argument", str(exc)) from None


def _mode(value: Any) -> str:
    if value not in MODES:
        raise ProtocolError("invalid_argument", f"mode must be one of {', '.join(MODES)}")
    return str(value)


def _on_pressure(value: Any) -> str:
    if value not in ("yield", "hold"):
        raise ProtocolError("invalid_argument", "on_pressure must be 'yield' or 'hold'")
    return str(value)


# Allowed args per command: name -> (validator, required)
_Check = Callable[[Any], Any]
SCHEMA: dict[str, dict[str, tuple[_Check, bool]]] = {
    "ping": {},
    "status": {"gpus": (_gpus, False)},
    "stop": {"gpus": (_gpus, False)},
    "start": {"gpus": (_gpus, False)},
    "pause": {"gpus": (_gpus, False), "seconds": (_seconds, False)},
    "resume": {"gpus": (_gpus, False)},
    "set": {
        "gpus": (_gpus, False),
        "vram": (_vram, False),
        "mode": (_mode, False),
        "target_util": (_number(1, 100, "target_util"), False),
        "busy_threshold": (_number(-1, 100, "busy_threshold"), False),
        "max_temp": (_number(1, 150, "max_temp"), False),
        "on_pressure": (_on_pressure, False),
        "max_hold": (_max_hold, False),
    },
    "yield": {"gpus": (_gpus, False), "pid": (_pid, True)},
}
COMMANDS = tuple(SCHEMA)


class _NotStrict(ValueError):
    """JSON that Python's parser accepts but RFC 8259 does not (NaN, duplicate keys)."""


def _refuse_constant(name: str) -> Any:
    raise _NotStrict(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _NotStrict(f"duplicate key {key[:64]!r}")
        out[key] = value
    return out


def loads_strict(text: str) -> Any:
    """json.loads refusing NaN/Infinity and duplicate object keys (ValueError/RecursionError)."""
    return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)


def parse_request(frame: bytes) -> Request:
    """Decode and validate one request frame. Raises ProtocolError (id lost when undecodable)."""
    if len(frame) > MAX_REQUEST_BYTES:
        raise ProtocolError(
            "bad_request", f"request is {len(frame)} bytes; the limit is {MAX_REQUEST_BYTES}"
        )
    try:
        obj = loads_strict(frame.decode("utf-8"))
    except _NotStrict as exc:
        raise ProtocolError("bad_request", f"request is not strict JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, bad UTF-8 and integers over Python's 4300-digit
        # conversion limit; RecursionError, nesting deeper than the interpreter's stack.
        msg = str(exc)[:200]
        raise ProtocolError("bad_request", f"request is not UTF-8 JSON: {msg}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "request must be a JSON object")
    req_id = obj.get("id")
    try:
        return _validate(obj, req_id)
    except ProtocolError as exc:
        exc.request_id = req_id  # type: ignore[attr-defined]
        raise


def _validate(obj: dict[str, Any], req_id: Any) -> Request:
    unknown_keys = set(obj) - {"v", "id", "cmd", "args"}
    if unknown_keys:
        raise ProtocolError("bad_request", f"unknown request fields: {sorted(unknown_keys)}")
    if obj.get("v", VERSION) != VERSION or isinstance(obj.get("v"), bool):
        raise ProtocolError("bad_request", f"unsupported protocol version {obj.get('v')!r}; use 1")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError("bad_request", "cmd must be a string")
    if cmd not in SCHEMA:
        raise ProtocolError("unknown_command", f"unknown command {cmd[:64]!r}")
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError("bad_request", "args must be a JSON object")
    schema = SCHEMA[cmd]
    extra = set(args) - set(schema)
    if extra:
        raise ProtocolError("invalid_argument", f"{cmd}: unknown argument(s) {sorted(extra)}")
    clean: dict[str, Any] = {}
    for name, (check, required) in schema.items():
        if name in args:
            clean[name] = check(args[name])
        elif required:
            raise ProtocolError("invalid_argument", f"{cmd}: missing argument {name!r}")
    if cmd == "set":
        _check_set(args)
    return Request(cmd=cmd, args=clean, id=req_id)


def _check_set(args: dict[str, Any]) -> None:
    if not set(args) - {"gpus"}:
        raise ProtocolError("invalid_argument", "set: give at least one setting to change")
    if "max_hold" in args and "gpus" in args:
        raise ProtocolError("invalid_argument",
                            "set: max_hold is for the whole supervisor; do not name gpus")


def encode_request(cmd: str, args: dict[str, Any] | None = None, req_id: Any = None) -> bytes:
    return json.dumps({"v": VERSION, "id": req_id, "cmd": cmd, "args": args or {}},
                      allow_nan=False).encode()


def _dumps_reply(body: dict[str, Any]) -> bytes:
    """Strict JSON whatever is in it: a value JSON cannot carry (NaN from a bug, an id built by
    a caller) turns the reply into an `internal` error rather than non-JSON on the wire."""
    try:
        return json.dumps(body, allow_nan=False).encode()
    except (ValueError, TypeError, RecursionError) as exc:
        req_id = body.get("id")
        safe_id = req_id if req_id is None or isinstance(req_id, str | int) else None
        try:
            fallback = {"v": VERSION, "id": safe_id, "ok": False,
                        "error": {"code": "internal", "message": f"unencodable reply: {exc}"}}
            return json.dumps(fallback, allow_nan=False).encode()
        except ValueError:  # an int id over the 4300-digit limit
            fallback["id"] = None
            return json.dumps(fallback, allow_nan=False).encode()


def ok_reply(req_id: Any, result: dict[str, Any]) -> bytes:
    return _dumps_reply({"v": VERSION, "id": req_id, "ok": True, "result": result})


def error_reply(req_id: Any, code: str, message: str) -> bytes:
    body = {"code": code, "message": message}
    return _dumps_reply({"v": VERSION, "id": req_id, "ok": False, "error": body})


def decode_reply(frame: bytes) -> dict[str, Any]:
    """Decode a reply; raises ValueError when it is not a v1 reply envelope."""
    obj = loads_strict(frame.decode("utf-8"))
    if not isinstance(obj, dict) or obj.get("v") != VERSION or not isinstance(obj.get("ok"), bool):
        raise ValueError("not a keepgpu v1 reply")
    return obj
