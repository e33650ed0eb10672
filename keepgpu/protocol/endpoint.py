"""Control endpoint syntax: `ipc://PATH`, `ipc://@NAME` (Linux abstract socket) and
`tcp://HOST:PORT` (PORT may be `*`: the kernel picks one, reported after the bind).

Anything else is refused here, before libzmq sees it: libzmq accepts forms we do not want to
promise (`tcp://eth0;host:port` source addresses) and would report others only at bind time.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

MAX_IPC_PATH = 107  # sun_path is 108 bytes on Linux, including the terminating NUL
_HOST_RE = re.compile(r"^(\*|[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*)$")


class EndpointError(ValueError):
    """A malformed or unsupported endpoint (exit 78)."""


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "ipc" (a path), "abstract" or "tcp"
    path: str = ""  # ipc: the socket path; abstract: the name after '@'
    host: str = ""  # tcp: without IPv6 brackets
    port: str = ""  # tcp: digits or "*"

    @property
    def loopback(self) -> bool:
        if self.kind != "tcp":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse(endpoint: str) -> Endpoint:
    """Split and check `endpoint`; raises EndpointError with a one-line reason."""
    if endpoint.startswith("ipc://"):
        path = endpoint[6:]
        if len(os.fsencode(path)) > MAX_IPC_PATH:
            raise EndpointError(f"{endpoint!r}: the ipc path is over {MAX_IPC_PATH} bytes")
        if path.startswith("@"):
            if len(path) < 2:
                raise EndpointError(f"{endpoint!r}: an abstract ipc name needs a name after '@'")
            return Endpoint("abstract", path=path[1:])
        if not path or "\0" in path:
            raise EndpointError(f"{endpoint!r}: give a socket path after ipc://")
        return Endpoint("ipc", path=path)
    if endpoint.startswith("tcp://"):
        return _parse_tcp(endpoint)
    raise EndpointError(f"{endpoint!r}: use ipc://PATH, ipc://@NAME or tcp://HOST:PORT")


def _parse_tcp(endpoint: str) -> Endpoint:
    rest = endpoint[6:]
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise EndpointError(f"{endpoint!r}: use tcp://HOST:PORT (PORT a number or *)")
    if not (port == "*" or (port.isdigit() and port.isascii() and 0 < int(port) < 65536)):
        raise EndpointError(
            f"{endpoint!r}: the port must be 1-65535 or *, with nothing after it (got {port!r})"
        )
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise EndpointError(f"{endpoint!r}: {host} is not an IPv6 address") from None
        return Endpoint("tcp", host=host[1:-1], port=port)
    if not _HOST_RE.match(host):
        raise EndpointError(f"{endpoint!r}: {host!r} is not a host name or address")
    return Endpoint("tcp", host=host, port=port)
