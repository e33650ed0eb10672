"""`keepgpu-mcp`: an MCP server (official `mcp` SDK, stdio) for AI agents.

A thin client of the control sockets: it never holds a GPU itself, and its tools name keepers,
never processes. `hold` starts a keeper of its own with a mandatory time limit; that keeper
also ends when this server ends (stdin closed, SIGTERM or SIGKILL: `--exit-with`). Every tool
failure is returned as a tool error (isError) in words; the server never dies from one.

Needs the extra: `pip install 'keepgpu[mcp]'`. Exit codes: 0 the client hung up; 78 the `mcp`
SDK is not installed.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from keepgpu._version import __version__
from keepgpu.context import HoldError
from keepgpu.mcp import words
from keepgpu.mcp.keepers import MAX_HOLD_LIMIT_S, KeeperError, Keepers
from keepgpu.protocol.control import MODES
from keepgpu.protocol.units import UnitError, parse_vram

_READ = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
Name = Annotated[str, Field(description="keeper name, as `hold` or `status` reports it",
                            pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Gpus = Annotated[list[Annotated[int, Field(ge=0)]] | None,
                 Field(description="GPU ordinals of that keeper; omit for all of them")]
_INSTRUCTIONS = (
    "keepgpu keeps shared GPUs held (VRAM plus light work) while their owner is not computing "
    "on them. `hold` starts a keeper with a required time limit; it also ends when this server "
    "ends. `yield_for` frees a keeper's GPUs for a while, then it holds them again. Read "
    "`status`/`explain` to see why a GPU is in its state."
)


_T = TypeVar("_T")
_EXPECTED = (KeeperError, HoldError, UnitError, ValueError)


def _write(destructive: bool, idempotent: bool) -> ToolAnnotations:
    return ToolAnnotations(read_only_hint=False, destructive_hint=destructive,
                           idempotent_hint=idempotent, open_world_hint=False)


def _tool_errors(fn: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
    """Anticipated failures become ToolError: the agent reads the message (isError) and the
    server logs one line; anything else is the SDK's "unexpected" error, still not fatal."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> _T:
        try:
            return await fn(*args, **kwargs)
        except _EXPECTED as exc:
            raise ToolError(str(exc)) from None

    return wrapper


class Tools:
    """The tools, as methods over one keeper registry (their docstrings are their specs)."""

    def __init__(self, reg: Keepers) -> None:
        self.reg = reg

    async def list_gpus(self) -> dict[str, Any]:
        """GPUs this user could hold here (no keeper needed), and which keeper holds each."""
        return await _list_gpus(self.reg)

    async def status(self, name: Annotated[str | None, Field(
            description="a keeper name; omit for every keeper of this user")] = None
                     ) -> dict[str, Any]:
        """State and telemetry of every GPU of one keeper, or of all keepers of this user."""
        found = await self.reg.statuses(name)
        text = "\n".join(words.summary(s) for s in found) or "no keeper is running"
        return {"text": text, "keepers": found}

    async def explain(self, name: Annotated[str | None, Field(
            description="a keeper name; omit for every keeper of this user")] = None
                      ) -> dict[str, Any]:
        """Why each GPU is in its state (held, backing off, failed...), with the numbers."""
        found = await self.reg.statuses(name)
        return {"text": "\n".join(words.explain(s) for s in found) or "no keeper is running"}

    async def hold(
        self,
        max_hold_s: Annotated[float, Field(gt=0, le=MAX_HOLD_LIMIT_S, description=(
            "required time limit in seconds: the keeper releases everything after it"))],
        gpus: Annotated[str, Field(description="all, ordinals (0,1) or GPU UUIDs")] = "all",
        vram: Annotated[str, Field(description="VRAM per GPU: 1GiB, 750MB, 20%, bytes")] = "1GiB",
        mode: Annotated[str | None, Field(description="duty, sm, compute or pstate")] = None,
    ) -> dict[str, Any]:
        """Start a keeper holding `gpus` until `max_hold_s` seconds pass, `release` is called
        or this server ends, whichever comes first. Returns once every GPU holds."""
        parse_vram(vram)  # UnitError in words before anything starts
        if mode is not None and mode not in MODES:
            raise KeeperError(f"mode must be one of {', '.join(MODES)}")
        options = {"mode": mode} if mode else {}
        name, owned = await self.reg.hold(gpus, vram, max_hold_s, options)
        st = (await self.reg.statuses(name))[0]
        return {"name": name, "pid": owned.keeper.pid, "ends_in_s": round(owned.left_s(), 1),
                "text": words.summary(st), "gpus": [words.line(g) for g in st["gpus"]]}

    async def release(self, name: Name, gpus: Gpus = None) -> dict[str, Any]:
        """Release a keeper's GPUs (memory freed); without `gpus` the keeper exits."""
        return await self.reg.release(name, gpus)

    async def pause(self, name: Name, gpus: Gpus = None, seconds: Annotated[
            float | None, Field(gt=0, le=30 * 24 * 3600, description=(
                "resume by itself after this; omit: until `resume`"))] = None) -> dict[str, Any]:
        """Stop a keeper's GPU work (its memory stays held) until `resume` or `seconds`."""
        args: dict[str, Any] = {"gpus": gpus} if gpus else {}
        if seconds is not None:
            args["seconds"] = seconds
        return await self.reg.call(name, "pause", args)

    async def resume(self, name: Name, gpus: Gpus = None) -> dict[str, Any]:
        """Resume a paused keeper's GPU work."""
        return await self.reg.call(name, "resume", {"gpus": gpus} if gpus else None)

    async def yield_for(self, name: Name, seconds: Annotated[float, Field(
            gt=0, le=24 * 3600, description="how long the GPUs stay free")],
                        gpus: Gpus = None) -> dict[str, Any]:
        """Free a keeper's GPUs (memory and work) for `seconds`, for a job of your own; the
        keeper holds them again afterwards. Returns once the memory is free."""
        return await _yield_for(self.reg, name, seconds, gpus)


# name -> annotations: read-only tools change nothing; among the others, only release takes
# something away (memory the agent asked to keep held).
ANNOTATIONS = {
    "list_gpus": _READ,
    "status": _READ,
    "explain": _READ,
    "hold": _write(False, False),
    "release": _write(True, True),
    "pause": _write(False, True),
    "resume": _write(False, True),
    "yield_for": _write(False, False),
}


def build(keepers: Keepers | None = None) -> MCPServer[Any]:
    """The server with its tools; `keepers` is the registry (one per server process)."""
    reg = keepers or Keepers()

    @asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[None]:
        try:
            yield None
        finally:
            await reg.close()  # keepers started here end with the server

    server: MCPServer[Any] = MCPServer("keepgpu", version=__version__,
                                        instructions=_INSTRUCTIONS, lifespan=lifespan)
    tools = Tools(reg)
    for name, hints in ANNOTATIONS.items():
        server.add_tool(_tool_errors(getattr(tools, name)), name=name, annotations=hints)
    return server


async def _yield_for(reg: Keepers, name: str, seconds: float,
                     gpus: list[int] | None) -> dict[str, Any]:
    # The yield is keyed to a pid the supervisor watches: a sleeper of ours that lives
    # `seconds`, so the GPUs come back on time even if this server is gone by then.
    sleeper = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds!r})"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    args: dict[str, Any] = {"pid": sleeper.pid, **({"gpus": gpus} if gpus else {})}
    try:
        result = await reg.call(name, "yield", args, timeout=30.0)
    except BaseException:
        sleeper.kill()
        sleeper.wait(5)
        raise
    asyncio.get_running_loop().create_task(_reap(sleeper))
    return {"name": name, "held_again_in_s": seconds, **result}


async def _reap(proc: subprocess.Popen[bytes]) -> None:
    while proc.poll() is None:
        await asyncio.sleep(0.5)


async def _list_gpus(reg: Keepers) -> dict[str, Any]:
    import os

    from keepgpu.supervisor.devices import ConfigError, visible_devices

    engine = os.environ.get("KEEPGPU_ENGINE", "auto")
    try:
        visible = await asyncio.to_thread(visible_devices, engine)
    except ConfigError as exc:
        raise ToolError(str(exc)) from None
    held: dict[str, list[str]] = {}
    for st in await reg.statuses(None):
        for g in st.get("gpus") or []:
            if g.get("held_bytes") and g.get("uuid"):
                held.setdefault(g["uuid"], []).append(str(st["supervisor"].get("name")))
    devices = [{"gpu": i, "entry": e, "uuid": u, "held_by": held.get(u or "", [])}
               for i, (e, u) in enumerate(zip(visible.entries, visible.uuids, strict=True))]
    return {"vendor": visible.vendor, "engine": visible.engine, "devices": devices}


def main() -> None:
    from keepgpu.cli.common import setup_logging

    setup_logging(0, "text", sys.stderr)  # stdout is the MCP stream
    build().run("stdio")


__all__ = ["build", "main"]
