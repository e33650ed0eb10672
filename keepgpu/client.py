"""A small client for the control socket (used by keepgpu-ctl and keepgpu.hold)."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import psutil
import zmq

from keepgpu.protocol.control import decode_reply, encode_request
from keepgpu.protocol.runtime import paths_for

_ids = itertools.count(1)


class NoSupervisor(Exception):
    """Nothing answered within the timeout (keepgpu-ctl exit 3)."""


class BadEndpoint(ValueError):
    """The endpoint is not one ZeroMQ can connect to (keepgpu-ctl exit 2)."""


class CommandFailed(Exception):
    """The supervisor answered with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def endpoint_for(name: str = "default", runtime_dir: Path | None = None) -> str:
    return paths_for(name, runtime_dir).control_endpoint


def stale_socket(socket_path: str) -> str | None:
    """Why the supervisor behind ipc socket file `socket_path` is known to be gone, else None.

    A SIGKILLed supervisor leaves its `<name>.ctl` and `<name>.pid` behind; connecting would
    wait out the whole timeout. The pid file next to the socket tells at once: its pid gone, a
    zombie, or not a keepgpu process (pid reused). Only reads files: taking the supervisor's
    flock, even briefly, would refuse a supervisor starting at that moment. Without a pid file
    (a custom --control path) or when the process cannot be inspected, None: ask the socket.
    """
    if not socket_path.endswith(".ctl"):
        return None
    pidfile = socket_path[: -len(".ctl")] + ".pid"
    try:
        pid = int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return f"its supervisor (pid {pid}) has exited; stale socket {socket_path}"
        if not any("keepgpu" in part for part in proc.cmdline()):
            return f"pid {pid} in {pidfile} is not a keepgpu supervisor; stale socket {socket_path}"
    except psutil.NoSuchProcess:
        return f"its supervisor (pid {pid}) is gone; stale socket {socket_path}"
    except psutil.Error:
        return None
    return None


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
            try:
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise BadEndpoint(f"cannot connect to {self.endpoint!r}: {exc.strerror}") from None
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
        """Send `cmd` and return its result; raises NoSupervisor, CommandFailed or BadEndpoint."""
        if self.endpoint.startswith("ipc://"):
            if not os.path.exists(self.endpoint[6:]):
                raise NoSupervisor(f"no supervisor socket at {self.endpoint[6:]}")
            why = stale_socket(self.endpoint[6:])
            if why:
                raise NoSupervisor(why)
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
