"""ZAP (ZeroMQ authentication protocol, RFC 27) decisions, answered by the loop itself.

Each socket names its kind in its ZAP domain, so a decision never depends on parsing an address:
- `DOMAIN` (ipc sockets): libzmq appends `:<uid>:<gid>:<pid>` (from SO_PEERCRED) to the address
  frame (e.g. `localhost:1000:1000:4242`); only our own uid and root get in.
- `TCP_DOMAIN` (tcp control socket): TCP carries no peer uid (any local user can reach a loopback
  port), so the peer must come with CURVE and an allowed client public key. NULL is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
DOMAIN = b"keepgpu"
TCP_DOMAIN = b"keepgpu-tcp"
_PEERCRED = re.compile(r":(\d+):(\d+):(\d+)$")


def peer_uid(address: str) -> int | None:
    """The uid in an ipc ZAP address (`...:uid:gid:pid`), None when absent."""
    m = _PEERCRED.search(address)
    return int(m.group(1)) if m else None


def allows(domain: bytes, address: str, mechanism: str, credentials: list[bytes],
           own_uid: int, curve_keys: Callable[[], set[bytes]] | None) -> bool:
    """Whether a peer may talk to this supervisor. `curve_keys` gives the allowed client
    public keys (raw 32 bytes); None when no socket serves CURVE."""
    if domain == DOMAIN:
        uid = peer_uid(address)
        return mechanism == "NULL" and uid is not None and uid in (own_uid, 0)
    if domain == TCP_DOMAIN and mechanism == "CURVE" and curve_keys is not None:
        return len(credentials) == 1 and credentials[0] in curve_keys()
    return False


def reply(frames: list[bytes], own_uid: int,
          curve_keys: Callable[[], set[bytes]] | None = None) -> list[bytes]:
    """ZAP reply frames for request `frames` (version, id, domain, address, identity,
    mechanism, credentials...)."""
    if len(frames) < 6 or frames[0] != b"1.0":
        req_id = frames[1] if len(frames) > 1 else b""
        return [b"1.0", req_id, b"500", b"malformed ZAP request", b"", b""]
    address = frames[3].decode("utf-8", "replace")
    mechanism = frames[5].decode("ascii", "replace")
    if allows(frames[2], address, mechanism, frames[6:], own_uid, curve_keys):
        return [b"1.0", frames[1], b"200", b"OK", b"", b""]
    return [b"1.0", frames[1], b"400", b"peer not allowed", b"", b""]


class RefusalLog:
    """Which refused handshakes get a log line: the first one per peer (address without the
    ipc pid, mechanism), then one summary line at most every `every_s` seconds. Anyone who can
    reach a tcp port can start handshakes: one line each would let them grow the log at will."""

    def __init__(self, every_s: float = 60.0, max_peers: int = 64) -> None:
        self.every_s = every_s
        self.max_peers = max_peers
        self._seen: set[tuple[str, str]] = set()
        self._quiet = 0
        self._last: float | None = None

    def note(self, address: str, mechanism: str, now: float) -> str | None:
        """The line to log for this refusal, or None to only count it."""
        peer = _PEERCRED.sub(lambda m: f":{m.group(1)}:{m.group(2)}", address)
        key = (peer, mechanism)
        if key not in self._seen and len(self._seen) < self.max_peers:
            self._seen.add(key)
            return f"refused a control peer: {address} ({mechanism})"
        self._quiet += 1
        if self._last is None:
            self._last = now
        if now - self._last < self.every_s:
            return None
        line = (f"refused {self._quiet} more control handshake(s) in the last "
                f"{now - self._last:.0f}s (last: {address}, {mechanism})")
        self._quiet, self._last = 0, now
        return line
