"""A small client for the control socket (used by keepgpu-ctl and keepgpu.hold)."""

from __future__ import annotations

import itertools
import os
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
    """One request at a time over a DEALER socket; every wait bounded by `timeout` seconds."""

    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
             ) -> dict[str, Any]:
        """Send `cmd` and return its result; raises NoSupervisor or CommandFailed."""
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            raise NoSupervisor(f"no supervisor socket at {self.endpoint[6:]}")
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        try:
            sock.connect(self.endpoint)
            req_id = next(_ids)
            sock.send_multipart([b"", encode_request(cmd, args, req_id)])
            wait_ms = int((self.timeout if timeout is None else timeout) * 1000)
            if not sock.poll(wait_ms):
                raise NoSupervisor(f"no answer from {self.endpoint} within {wait_ms / 1000:g}s")
            frames = sock.recv_multipart()
            reply = decode_reply(frames[-1])
        except (ValueError, UnicodeDecodeError) as exc:
            raise CommandFailed("bad_reply", f"unreadable reply: {exc}") from None
        finally:
            sock.close(linger=0)
            ctx.term()
        if not reply["ok"]:
            err = reply.get("error") or {}
            raise CommandFailed(str(err.get("code")), str(err.get("message")))
        result = reply.get("result")
        return result if isinstance(result, dict) else {}
