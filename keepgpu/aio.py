"""asyncio forms of the control client, `hold()` and `yielded()` (over `zmq.asyncio`).

For asyncio servers (inference, schedulers) that hold GPUs between requests and yield them
around requests: the blocking `keepgpu.client.Client` would stall the event loop for as long as
a command takes (a `stop` waits for the release, up to the join and kill timeouts).

    async with keepgpu.aio.hold(gpus=[0], vram="4GiB") as client:   # a keeper of our own
        ...
        async with client.yielded():    # GPUs free for the request, held again afterwards
            await serve_one_request()

The same rules as the blocking forms: every wait is bounded, errors are `NoSupervisor`,
`CommandFailed`/`AuthFailed` and `HoldError`, a keeper started by `hold()` ends with this process
(`--exit-with`), and an error is raised, never swallowed. Not thread-safe: one AsyncClient per
event loop.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from keepgpu.client import (
    _HANDSHAKE_EVENTS,
    AuthFailed,
    Client,
    CommandFailed,
    NoSupervisor,
    _handshake_failure,
    endpoint_for,
    reply_result,
)
from keepgpu.context import _FAILED, _HELD, HoldError, _Keeper, _reason, _unique_name
from keepgpu.protocol import keys
from keepgpu.protocol.control import encode_request

__all__ = ["AsyncClient", "AsyncKeeper", "start_keeper", "hold", "yielded"]

_shadow: zmq.asyncio.Context | None = None
_POLL_S = 0.1
# The yield token: a child that lives until its stdin closes (our end of the block, or this
# process's death), so the supervisor, which watches its pid, re-holds in every case.
_TOKEN = [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"]


def _context() -> zmq.asyncio.Context:
    # A shadow of the process-wide context: one set of I/O threads for both clients. (The
    # asyncio class's own instance() would hand back a sync context made first elsewhere.)
    global _shadow
    if _shadow is None or _shadow.closed:
        _shadow = zmq.asyncio.Context(zmq.Context.instance())
    return _shadow


class AsyncClient:
    """The control client as coroutines: one DEALER socket kept open between calls. Every wait
    is bounded by `timeout` seconds; `close()` (or `async with`) closes the socket."""

    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        # Endpoint parsing and CURVE key lookup are shared with the blocking client, which
        # never opens a socket of its own here.
        self._helper = Client(endpoint, timeout)
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._ids = 0

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for sock in (self._sock, self._monitor):
            if sock is not None:
                sock.close(linger=0)
        self._sock = self._monitor = None

    def __del__(self) -> None:
        self.close()

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            self._helper.endpoint = self.endpoint
            ep = self._helper._ep  # raises CommandFailed("bad_endpoint")
            sock = _context().socket(zmq.DEALER)
            sock.linger = 0
            try:
                if ep.kind == "tcp":
                    self._helper._use_curve(sock)  # type: ignore[arg-type]
                self._monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
                self._monitor.linger = 0
                sock.connect(self.endpoint)
            except BaseException:
                sock.close(linger=0)
                self.close()
                raise
            self._sock = sock
        return self._sock

    async def call(self, cmd: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        """Send `cmd` (a protocol v1 command) and return its result.

        Raises NoSupervisor (nothing answered within `timeout` s), CommandFailed (an error
        reply; `.code` is the protocol's error code) or AuthFailed (refused at the handshake).
        """
        self._helper.endpoint = self.endpoint
        ep = self._helper._ep
        if ep.kind == "ipc" and not os.path.exists(ep.path):
            raise NoSupervisor(f"no supervisor socket at {ep.path}")
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        sock = self._socket()
        self._ids += 1
        req_id = f"aio-{id(self):x}-{self._ids}"
        await sock.send_multipart([b"", encode_request(cmd, args, req_id)])
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not await self._wait(sock, left):
                self.close()  # its queue may hold a stale request
                raise NoSupervisor(f"no answer from {self.endpoint} within {wait:g}s")
            result = reply_result((await sock.recv_multipart())[-1], req_id)
            if result is not None:
                return result

    async def _wait(self, sock: zmq.asyncio.Socket, seconds: float) -> bool:
        """Whether a reply is readable within `seconds`; AuthFailed on a refused handshake."""
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        mon = self._monitor
        if mon is not None:
            poller.register(mon, zmq.POLLIN)
        deadline = time.monotonic() + seconds
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            events = dict(await poller.poll(left_ms))
            if sock in events:
                return True
            if mon is None or mon not in events:
                return False
            event = int(parse_monitor_message(await mon.recv_multipart())["event"])
            if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                host = self._helper._ep.host
                where = f"{keys.keys_dir() / keys.SERVERS_DIR / f'{host}.key'} or your own " \
                    f"{keys.keys_dir() / keys.PUBLIC_FILE}"
                self.close()
                raise AuthFailed(_handshake_failure(event, self.endpoint, where))
            if left_ms <= 0:
                return False

    @asynccontextmanager
    async def yielded(self, gpus: list[int | str] | None = None,
                      timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Free `gpus` (default: all of this keeper's) for the block; the keeper holds them
        again when the block ends, however it ends (protocol `yield {gpus, pid}`).

        The pid given to the supervisor is a small token child of ours that lives until the
        block ends or this process dies: the supervisor watches it, not us. Yields the
        `yield` reply. Raises as `call` does (CommandFailed `unknown_command` from a keeper
        that has no `yield`); the token is gone whenever this returns or raises.
        """
        token = subprocess.Popen(_TOKEN, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            args: dict[str, Any] = {"pid": token.pid}
            if gpus is not None:
                args["gpus"] = list(gpus)
            # The reply comes once memory is free: up to the keeper's join and kill timeouts.
            wait = timeout if timeout is not None else max(self.timeout, 30.0)
            result = await self.call("yield", args, timeout=wait)
            yield result
        finally:
            await _end_token(token)


async def _end_token(token: subprocess.Popen[bytes]) -> None:
    """Close the token's stdin (it exits at once) and reap it, bounded; SIGKILL if it lingers."""
    if token.stdin is not None:
        token.stdin.close()
    for attempt in range(2):
        deadline = time.monotonic() + 5.0
        while token.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if token.returncode is not None or attempt:
            return
        token.kill()


class AsyncKeeper:
    """A keeper process started by `start_keeper`: its name, process and AsyncClient."""

    def __init__(self, keeper: _Keeper) -> None:
        self._keeper = keeper
        keeper.client.close()  # the blocking client is never used here
        self.name = keeper.paths.name
        self.client = AsyncClient(keeper.paths.control_endpoint, timeout=5.0)

    @property
    def pid(self) -> int:
        return self._keeper.proc.pid

    @property
    def log(self) -> Path:
        return self._keeper.log

    def running(self) -> bool:
        return self._keeper.proc.poll() is None

    async def wait_holding(self, timeout: float) -> None:
        """Until every GPU holds; HoldError (with each GPU's reason) when one fails, the
        keeper exits, or `timeout` seconds pass."""
        k = self._keeper
        deadline = time.monotonic() + timeout
        gpus: list[dict[str, Any]] = []
        while True:
            code = k.proc.poll()
            if code is not None:
                raise k._exited(code, gpus)
            try:
                gpus = (await self.client.call("status", timeout=1.0))["gpus"] or gpus
            except NoSupervisor:
                pass  # not bound yet, or busy: the deadline bounds this
            states = [g["state"] for g in gpus]
            if gpus and all(s in _HELD or s in _FAILED for s in states):
                failed = {g["gpu"]: _reason(g) for g in gpus if g["state"] in _FAILED}
                if not failed:
                    return
                raise HoldError(f"{len(failed)} of {len(gpus)} GPU(s) could not be held",
                                failed, k.log)
            if time.monotonic() >= deadline:
                waiting = {g["gpu"]: _reason(g) for g in gpus if g["state"] not in _HELD}
                raise HoldError(f"not every GPU held within {timeout:g}s", waiting, k.log)
            await asyncio.sleep(_POLL_S)

    async def release(self, forget_log: bool = True) -> int | None:
        """Stop the keeper and reap it, bounded by its join and kill timeouts plus slack;
        SIGKILL if it does not end. Returns its exit code (None: still there after SIGKILL)."""
        k = self._keeper
        proc = k.proc
        try:
            if proc.poll() is None:
                try:
                    await self.client.call("stop", timeout=k.bound_s)
                except (NoSupervisor, CommandFailed):
                    proc.terminate()
            for signal_next in (proc.kill, None):
                deadline = time.monotonic() + (k.bound_s if signal_next else 5.0)
                while proc.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                if proc.returncode is not None or signal_next is None:
                    break
                signal_next()  # its workers follow (PR_SET_PDEATHSIG)
        finally:
            self.client.close()
        if proc.returncode is not None:
            k.release(forget_log)  # reaped already: this only removes the keeper's files
        return proc.returncode


async def start_keeper(gpus: str | list[int] = "all", vram: str = "1GiB", *,
                       name: str | None = None, start_timeout: float = 120.0,
                       own_name: bool | None = None, **options: Any) -> AsyncKeeper:
    """Start a keeper (a `keepgpu-supervise` child ending with this process) and wait until
    every GPU holds. Options as for `keepgpu.hold()`; `own_name` (default: no `name` given)
    says the name is this call's alone, so its files are removed after release. Raises
    HoldError (the keeper is then released already)."""
    if options.get("detach"):
        raise ValueError("hold() runs its keeper as a child; detach is not an option here")
    spec = ",".join(str(g) for g in gpus) if isinstance(gpus, list) else gpus
    own = name is None if own_name is None else own_name
    keeper = AsyncKeeper(_Keeper(name or _unique_name(), spec, vram, dict(options), own))
    try:
        await keeper.wait_holding(start_timeout)
    except BaseException:
        await keeper.release(forget_log=False)
        raise
    return keeper


@asynccontextmanager
async def hold(gpus: str | list[int] = "all", vram: str = "1GiB", *, name: str | None = None,
               start_timeout: float = 120.0, **options: Any) -> AsyncIterator[AsyncClient]:
    """`async with hold(...) as client`: `keepgpu.hold()` without blocking the event loop."""
    keeper = await start_keeper(gpus, vram, name=name, start_timeout=start_timeout, **options)
    try:
        yield keeper.client
    finally:
        await keeper.release(forget_log=True)


@asynccontextmanager
async def yielded(gpus: list[int | str] | None = None, *, name: str = "default",
                  endpoint: str | None = None, timeout: float = 30.0
                  ) -> AsyncIterator[dict[str, Any]]:
    """Free `gpus` of the keeper `name` (or at `endpoint`) for the block: `keepgpu-ctl yield`
    as an async context manager. Raises NoSupervisor when no keeper answers."""
    async with AsyncClient(endpoint or endpoint_for(name), timeout=5.0) as client:
        async with client.yielded(gpus, timeout=timeout) as result:
            yield result
