"""ZAP (ZeroMQ authentication protocol, RFC 27) decisions: only our own uid and root get in.

For ipc peers libzmq appends `:<uid>:<gid>:<pid>` (from SO_PEERCRED) to the request's address
frame (e.g. `localhost:1000:1000:4242`). TCP is only ever bound on loopback; those peers are
admitted as local.
"""

from __future__ import annotations

import ipaddress
import re

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
DOMAIN = b"keepgpu"
_PEERCRED = re.compile(r":(\d+):(\d+):(\d+)$")


def peer_uid(address: str) -> int | None:
    """The uid in an ipc ZAP address (`...:uid:gid:pid`), None when absent (tcp peers)."""
    try:
        ipaddress.ip_address(address)
        return None  # a bare IP address: a tcp peer (IPv6 literals contain colons too)
    except ValueError:
        pass
    m = _PEERCRED.search(address)
    return int(m.group(1)) if m else None


def allows(address: str, mechanism: str, own_uid: int) -> bool:
    """Whether a peer may talk to this supervisor."""
    if mechanism != "NULL":
        return False
    uid = peer_uid(address)
    if uid is not None:
        return uid in (own_uid, 0)
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def reply(frames: list[bytes], own_uid: int) -> list[bytes]:
    """ZAP reply frames for request `frames` (version, id, domain, address, identity, mech...)."""
    if len(frames) < 6 or frames[0] != b"1.0":
        req_id = frames[1] if len(frames) > 1 else b""
        return [b"1.0", req_id, b"500", b"malformed ZAP request", b"", b""]
    address = frames[3].decode("utf-8", "replace")
    mechanism = frames[5].decode("ascii", "replace")
    if allows(address, mechanism, own_uid):
        return [b"1.0", frames[1], b"200", b"OK", b"", b""]
    return [b"1.0", frames[1], b"400", b"peer not allowed", b"", b""]
