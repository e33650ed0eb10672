"""The keepers one `keepgpu-mcp` process knows: those it started, and the others it can find.

A keeper started here (`hold`) is a `keepgpu-supervise` child named `mcp-<pid>-<n>-<hex>` that
- ends with this server (`--exit-with` our pid, SIGKILL of the server included);
- ends at its time limit, which the server enforces itself and, where the supervisor has the
  option, also hands to it as `--max-hold` (so it holds even if this server's timer never runs).
Other keepers are found by their control sockets in the runtime dir (`<name>.ctl`): only
keepgpu supervisors of this user live there (the dir is 0700 and ours). Tools name keepers,
never pids; the only processes this module signals are its own children.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from keepgpu.aio import AsyncClient, AsyncKeeper, start_keeper
from keepgpu.client import CommandFailed, NoSupervisor
from keepgpu.protocol.runtime import (
    RuntimeDirError,
    default_runtime_dir,
    paths_for,
    validate_name,
)

log = logging.getLogger("keepgpu.mcp")
_counter = itertools.count(1)
MAX_HOLD_LIMIT_S = 7 * 24 * 3600.0  # a week: an agent's hold is never open-ended


class KeeperError(Exception):
    """A tool failure in words (the MCP tool returns it with isError)."""


@dataclass
class Owned:
    keeper: AsyncKeeper
    gpus: str
    deadline: float  # time.monotonic()
    timer: asyncio.Task[None] | None = field(default=None, repr=False)

    def left_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class Keepers:
    """Keepers by name; every call is bounded by `timeout` seconds per control request."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.owned: dict[str, Owned] = {}

    def endpoint(self, name: str) -> str:
        try:
            return paths_for(validate_name(name)).control_endpoint
        except RuntimeDirError as exc:
            raise KeeperError(str(exc)) from None

    def names(self) -> list[str]:
        """Keepers with a control socket in the runtime dir (some may be stale)."""
        try:
            runtime = default_runtime_dir()
            found = {p.name[: -len(".ctl")] for p in runtime.glob("*.ctl")}
        except (OSError, RuntimeDirError):
            found = set()
        return sorted(found | set(self.owned))

    async def call(self, name: str, cmd: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        """One control request to keeper `name`; KeeperError in words on any failure."""
        async with AsyncClient(self.endpoint(name), self.timeout) as client:
            try:
                return await client.call(cmd, args, timeout)
            except NoSupervisor:
                raise KeeperError(f"no keeper named {name!r} is answering") from None
            except CommandFailed as exc:
                if exc.code == "unknown_command":
                    raise KeeperError(f"keeper {name!r} does not know {cmd!r} (it runs an older "
                                      "keepgpu)") from None
                raise KeeperError(f"keeper {name!r} refused {cmd}: {exc.message}") from None

    async def statuses(self, name: str | None) -> list[dict[str, Any]]:
        """Status replies of `name`, or of every keeper answering (stale sockets skipped)."""
        if name is not None:
            return [self._annotate(name, await self.call(name, "status"))]

        async def one(n: str) -> dict[str, Any] | None:
            try:
                return self._annotate(n, await self.call(n, "status", timeout=1.0))
            except KeeperError:
                return None

        replies = await asyncio.gather(*(one(n) for n in self.names()))
        return [r for r in replies if r is not None]

    def _annotate(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        owned = self.owned.get(name)
        status["started_here"] = owned is not None
        if owned is not None:
            status["ends_in_s"] = round(owned.left_s(), 1)
        return status

    async def hold(self, gpus: str, vram: str, max_hold_s: float,
                   options: dict[str, Any]) -> tuple[str, Owned]:
        """Start a keeper ending after `max_hold_s` seconds or with this server."""
        if not 0 < max_hold_s <= MAX_HOLD_LIMIT_S:
            raise KeeperError(f"max_hold_s must be in (0, {MAX_HOLD_LIMIT_S:g}]: {max_hold_s}")
        name = f"mcp-{os.getpid()}-{next(_counter)}-{secrets.token_hex(3)}"
        # The keeper ends by itself too (--max-hold), should this server's timer never fire.
        options = {**options, "max_hold": f"{max_hold_s:g}"}
        keeper = await start_keeper(gpus, vram, name=name, own_name=True, **options)
        owned = Owned(keeper, gpus, time.monotonic() + max_hold_s)
        owned.timer = asyncio.create_task(self._expire(name, max_hold_s))
        self.owned[name] = owned
        log.info("keeper %s pid %d holds gpus %s for at most %g s", name, keeper.pid, gpus,
                 max_hold_s)
        return name, owned

    async def _expire(self, name: str, after_s: float) -> None:
        await asyncio.sleep(after_s)
        log.info("keeper %s reached its time limit (%g s): releasing", name, after_s)
        await self.release(name, from_timer=True)

    async def release(self, name: str, gpus: list[int] | None = None,
                      from_timer: bool = False) -> dict[str, Any]:
        """Release `gpus` of keeper `name` (all: the keeper exits). Keepers started here are
        reaped and their files removed."""
        owned = self.owned.get(name)
        if gpus is not None or owned is None:
            stop_timeout = 30.0  # the reply comes once released: join + kill timeouts
            return await self.call(name, "stop", {"gpus": gpus} if gpus else None, stop_timeout)
        self.owned.pop(name, None)
        if owned.timer is not None and not from_timer:
            owned.timer.cancel()
        code = await owned.keeper.release(forget_log=True)
        return {"name": name, "exit_code": code, "released": code == 0}

    async def close(self) -> None:
        """Release every keeper started here (the server is ending), all at once."""
        names = list(self.owned)
        await asyncio.gather(*(self.release(n) for n in names), return_exceptions=True)
