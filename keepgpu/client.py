"""A small client for the control socket (used by keepgpu-ctl and keepgpu.hold)."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from keepgpu.protocol import keys
from keepgpu.protocol.control import decode_reply, encode_request
from keepgpu.protocol.endpoint import Endpoint, EndpointError
from keepgpu.protocol.endpoint import parse as parse_endpoint
from keepgpu.protocol.runtime import paths_for

_ids = itertools.count(1)
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


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


class AuthFailed(CommandFailed):
    """The supervisor refused this client during the handshake (uid not allowed, CURVE key
    missing, unknown or mismatched). keepgpu-ctl exit 1: a supervisor is there, unlike exit 3."""

    def __init__(self, message: str) -> None:
        super().__init__("auth_failed", message)


def _handshake_failure(event: int, endpoint: str, server_key_file: str) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the supervisor at {endpoint} refused this client (its uid, or its CURVE key, "
                "is not allowed there)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (f"security handshake with {endpoint} failed (tcp control needs CURVE on both "
                "sides; ipc needs none)")
    return (f"CURVE handshake with {endpoint} failed: the server's key is not the one expected "
            f"({server_key_file})")


def endpoint_for(name: str = "default", runtime_dir: Path | None = None) -> str:
    return paths_for(name, runtime_dir).control_endpoint


def reply_result(frame: bytes, req_id: Any) -> dict[str, Any] | None:
    """The result of the reply to request `req_id`; None for a reply to an earlier call that
    timed out (to be skipped). Raises CommandFailed for an error reply or an unreadable one."""
    try:
        reply = decode_reply(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandFailed("bad_reply", f"unreadable reply: {exc}") from None
    if reply.get("id") != req_id:
        return None
    if not reply["ok"]:
        err = reply.get("error") or {}
        raise CommandFailed(str(err.get("code")), str(err.get("message")))
    result = reply.get("result")
    return result if isinstance(result, dict) else {}


def stale_socket(socket_path: str) -> str | None:
    """Why the supervisor behind ipc socket file `socket_path` is known to be gone, else None.

    A SIGKILLed supervisor leaves its socket file behind, and a ZeroMQ connect to it would wait
    out the whole timeout. A plain non-blocking AF_UNIX connect tells at once: ECONNREFUSED
    means nobody listens there any more. It reads no pid file (the pid may belong to another
    pid namespace, e.g. a container sharing the runtime dir) and takes no lock (a supervisor
    starting at that moment would be refused). Anything else (a listener, a full backlog,
    no permission): None, and the socket itself is asked.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(socket_path)
    except ConnectionRefusedError:
        return f"the supervisor behind {socket_path} is gone (nothing listens on that socket)"
    except OSError:
        return None
    finally:
        probe.close()
    return None


class Client:
    """Requests over one DEALER socket, kept open between calls (one connection, one ZAP
    check), on the process-wide ZeroMQ context. Every wait is bounded by `timeout` seconds. Not
    thread-safe: use one Client per thread. `close()` (or a with-block) closes the socket."""

    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._sock: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._parsed: tuple[str, Endpoint] | None = None

    @property
    def _ep(self) -> Endpoint:
        """The parsed endpoint (re-parsed when `endpoint` was reassigned)."""
        if self._parsed is None or self._parsed[0] != self.endpoint:
            try:
                self._parsed = (self.endpoint, parse_endpoint(self.endpoint))
            except EndpointError as exc:
                raise CommandFailed("bad_endpoint", str(exc)) from None
        return self._parsed[1]

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
                if self._ep.kind == "tcp":
                    self._use_curve(sock)
                # A refused handshake is never an answer: only the monitor sees it.
                self._monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
                self._monitor.linger = 0
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                self._drop_socket()
                raise BadEndpoint(f"cannot connect to {self.endpoint!r}: {exc.strerror}") from None
            except BaseException:
                sock.close(linger=0)
                self._drop_socket()
                raise
            self._sock = sock
        return self._sock

    def _use_curve(self, sock: zmq.Socket[bytes]) -> None:
        """CURVE with the user's keypair; the server key from servers/<host>.key or our own."""
        try:
            own = keys.own_keypair()
            server = keys.server_public_key(self._ep.host, own)
        except keys.KeyFileError as exc:
            raise AuthFailed(f"cannot use CURVE keys for {self.endpoint}: {exc}") from None
        sock.curve_secretkey = own.secret
        sock.curve_publickey = own.public
        sock.curve_serverkey = server

    def _drop_socket(self) -> None:
        """Forget the socket (after a timeout its queue may hold stale requests)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    def close(self) -> None:
        self._drop_socket()

    def __del__(self) -> None:
        # A Client dropped without close() still closes its socket (no ResourceWarning).
        self._drop_socket()

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
             ) -> dict[str, Any]:
        """Send `cmd` and return its result; raises NoSupervisor, CommandFailed, AuthFailed or
        BadEndpoint."""
        ep = self._ep
        # An abstract name (ipc://@NAME) has no file to look for.
        if ep.kind == "ipc":
            if not os.path.exists(ep.path):
                raise NoSupervisor(f"no supervisor socket at {ep.path}")
            why = stale_socket(ep.path)
            if why:
                raise NoSupervisor(why)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        sock = self._socket()
        req_id = next(_ids)
        sock.send_multipart([b"", encode_request(cmd, args, req_id)])
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._wait(sock, left_ms):
                self._drop_socket()
                raise NoSupervisor(f"no answer from {self.endpoint} within {wait:g}s")
            result = reply_result(sock.recv_multipart()[-1], req_id)
            if result is not None:
                return result

    def yield_bound(self) -> float:
        """Seconds a `yield` (or `stop`) reply may take: the keeper's join + kill timeouts
        plus this client's timeout."""
        cfg = self.call("status").get("supervisor", {}).get("config", {})
        return float(cfg.get("join_timeout_s", 5)) + float(cfg.get("kill_timeout_s", 5)) \
            + self.timeout

    @contextmanager
    def yielded(self, gpus: list[int | str] | None = None) -> Iterator[dict[str, Any]]:
        """Free `gpus` (all when None) for the block: protocol `yield`, keyed to a small token
        process of ours that the keeper watches. Entering returns once the workers have exited
        (their memory is free) with the `yield` result; leaving ends the token, and the keeper
        holds again. Should this process die, the token sees its pipe close and ends too.
        Raises NoSupervisor, CommandFailed (also when some GPU's worker is unkillable)."""
        token = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", "import sys; sys.stdin.buffer.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            args: dict[str, Any] = {"pid": token.pid}
            if gpus is not None:
                args["gpus"] = list(gpus)
            result = self.call("yield", args, timeout=self.yield_bound())
            stuck = [g["gpu"] for g in result.get("gpus", []) if g.get("outcome") == "unkillable"]
            if stuck:
                raise CommandFailed("conflict", f"GPU(s) {stuck}: worker unkillable, memory "
                                    "may still be held")
            yield result
        finally:
            assert token.stdin is not None
            token.stdin.close()
            try:
                token.wait(5)
            except subprocess.TimeoutExpired:
                token.kill()
                token.wait(5)

    def _wait(self, sock: zmq.Socket[bytes], timeout_ms: int) -> bool:
        """Whether a reply is readable within `timeout_ms`; raises AuthFailed as soon as the
        monitor reports a failed handshake (libzmq would retry it silently forever)."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        mon = self._monitor
        if mon is not None:
            poller.register(mon, zmq.POLLIN)
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            events = dict(poller.poll(max(0, left_ms)))
            if sock in events:
                return True
            if mon is None or mon not in events:
                return False
            event = int(recv_monitor_message(mon)["event"])
            if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                host = self._ep.host
                where = f"{keys.keys_dir() / keys.SERVERS_DIR / f'{host}.key'} or your own " \
                    f"{keys.keys_dir() / keys.PUBLIC_FILE}"
                self._drop_socket()
                raise AuthFailed(_handshake_failure(event, self.endpoint, where))
            if left_ms <= 0:
                return False
