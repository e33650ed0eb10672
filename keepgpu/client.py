"""A small client for the control socket (used by keepgpu-ctl and keepgpu.hold)."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import zmq

from keepgpu.protocol.control import decode_reply, encode_request
from keepgpu.protocol.runtime import paths_for

_ids = itertools.count(1)


class NoSupervisor(Exception):
    """Nothing answered within the timeout (keepgpu-ctl exit 3)."""


class CommandFailed(Exception):
    """The supervisor answered with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def endpoint_for(name: str = "default", runtime_dir: Path | None = None) -> str:
    return paths_for(name, runtime_dir).control_endpoint


class Client:
    """Requests over one DEALER socket, kept open between calls (one connection, one ZAP
    check), on the process-wide ZeroMQ context. Every wait is bounded by `timeout` seconds. Not
    thread-safe: use one Client per thread. `close()` (or a with-block) closes the socket."""

    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._sock: zmq.Socket[bytes] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            # The shared context is never terminated by garbage collection, which could block
            # on a socket not yet finalized; linger 0 makes every close immediate.
            sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _drop_socket(self) -> None:
        """Forget the socket (after a timeout its queue may hold stale requests)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        self._drop_socket()

    def __del__(self) -> None:
        # A Client dropped without close() still closes its socket (no ResourceWarning).
        self._drop_socket()

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
             ) -> dict[str, Any]:
        """Send `cmd` and return its result; raises NoSupervisor or CommandFailed."""
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            raise NoSupervisor(f"no supervisor socket at {self.endpoint[6:]}")
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        sock = self._socket()
        req_id = next(_ids)
        sock.send_multipart([b"", encode_request(cmd, args, req_id)])
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not sock.poll(left_ms):
                self._drop_socket()
                raise NoSupervisor(f"no answer from {self.endpoint} within {wait:g}s")
            frames = sock.recv_multipart()
            try:
                reply = decode_reply(frames[-1])
            except (ValueError, UnicodeDecodeError) as exc:
                raise CommandFailed("bad_reply", f"unreadable reply: {exc}") from None
            if reply.get("id") == req_id:
                break  # anything else answers an earlier call that timed out
        if not reply["ok"]:
            err = reply.get("error") or {}
            raise CommandFailed(str(err.get("code")), str(err.get("message")))
        result = reply.get("result")
        return result if isinstance(result, dict) else {}
