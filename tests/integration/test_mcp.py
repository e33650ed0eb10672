"""`keepgpu-mcp` through the SDK's own stdio client: a real server process, real keepers (fake
engine), real ZeroMQ."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from kgtest import alive, proc_key, wait_until

pytest.importorskip("mcp.server.mcpserver", reason="keepgpu-mcp needs the mcp extra")

from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {"list_gpus", "status", "explain", "hold", "release", "pause", "resume", "yield_for"}
Session = Callable[[ClientSession], Awaitable[None]]


@pytest.fixture
def env(base_env: dict[str, str]) -> dict[str, str]:
    # stdio_client passes only a minimal environment plus these.
    keep = ("KEEPGPU_", "PYTHON")
    out = {k: v for k, v in base_env.items() if k.startswith(keep)}
    out.update(PYTHONPATH=str(ROOT), KEEPGPU_FAKE_GPUS="2", KEEPGPU_HEARTBEAT="0.2",
               KEEPGPU_JOIN_TIMEOUT="2", KEEPGPU_KILL_TIMEOUT="2")
    return out


def run_session(env: dict[str, str], body: Session, timeout: float = 50) -> None:
    params = StdioServerParameters(command=sys.executable, args=["-m", "keepgpu.mcp"], env=env)

    async def main() -> None:
        with anyio.fail_after(timeout):
            async with stdio_client(params) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    await body(session)

    anyio.run(main)


async def call(session: ClientSession, tool: str, **args: Any) -> tuple[bool, Any]:
    """(is_error, structured result or the error text)."""
    res: Any = await session.call_tool(tool, args)
    if res.is_error:
        return True, res.content[0].text
    return False, res.structured_content


def _tree(status: dict[str, Any]) -> list[tuple[int, float]]:
    """Process keys of the keeper and its workers."""
    pids = [status["supervisor"]["pid"], *(g["pid"] for g in status["gpus"])]
    keys = [proc_key(p) for p in pids]
    assert all(keys)
    return keys  # type: ignore[return-value]


def _kill(keys: list[tuple[int, float]]) -> None:
    for key in keys:
        if alive(key):
            os.kill(key[0], signal.SIGKILL)


def test_tools_annotations_and_a_full_hold_cycle(env: dict[str, str], runtime_dir: Path) -> None:
    seen: list[tuple[int, float]] = []

    async def body(s: ClientSession) -> None:
        tools = {t.name: t for t in (await s.list_tools()).tools}
        assert set(tools) == TOOLS
        for name in ("list_gpus", "status", "explain"):
            assert tools[name].annotations.read_only_hint is True  # type: ignore[union-attr]
        assert tools["release"].annotations.destructive_hint is True  # type: ignore[union-attr]
        assert tools["hold"].annotations.destructive_hint is False  # type: ignore[union-attr]
        assert tools["resume"].annotations.idempotent_hint is True  # type: ignore[union-attr]
        assert "max_hold_s" in tools["hold"].input_schema["required"]

        err, held = await call(s, "hold", gpus="0,1", vram="256MiB", max_hold_s=120)
        assert not err, held
        name = held["name"]
        err, st = await call(s, "status", name=name)
        assert not err
        status = st["keepers"][0]
        seen.extend(_tree(status))
        assert [g["state"] for g in status["gpus"]] == ["holding", "holding"]
        assert all(g["held_bytes"] == 256 * 1024**2 for g in status["gpus"])
        # The keeper is this server's child, never the agent's process.
        assert psutil.Process(status["supervisor"]["pid"]).ppid() != os.getpid()
        err, all_st = await call(s, "status")
        assert name in [k["supervisor"]["name"] for k in all_st["keepers"]]
        err, gpus = await call(s, "list_gpus")
        assert not err and [d["held_by"] for d in gpus["devices"]] == [[name], [name]]
        err, why = await call(s, "explain", name=name)
        assert not err and "GPU 0" in why["text"] and "256 MiB" in why["text"]

        err, _ = await call(s, "pause", name=name, gpus=[1])
        assert not err
        reasons: list[Any] = []
        deadline = time.monotonic() + 10
        while reasons != [None, "paused"] and time.monotonic() < deadline:
            await anyio.sleep(0.1)  # the worker reports the pause with its next heartbeat
            err, st = await call(s, "status", name=name)
            reasons = [g["reason"] for g in st["keepers"][0]["gpus"]]
        assert reasons == [None, "paused"]
        assert not (await call(s, "resume", name=name))[0]

        err, rel = await call(s, "release", name=name)
        assert not err and rel["released"] is True
        assert not any(alive(k) for k in seen)
        err, st = await call(s, "status")
        assert st["keepers"] == []

    try:
        run_session(env, body)
        assert not any(alive(k) for k in seen)
        assert not list(runtime_dir.glob("mcp-*"))  # no socket, lock, pid or log file left
    finally:
        _kill(seen)


def test_bad_input_is_a_tool_error_and_the_server_lives_on(env: dict[str, str]) -> None:
    async def body(s: ClientSession) -> None:
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("hold", {"gpus": "0"}, "max_hold_s"),  # the time limit is required
            ("hold", {"max_hold_s": 0}, "max_hold_s"),
            ("hold", {"max_hold_s": 60, "vram": "10XB"}, "10XB"),
            ("hold", {"max_hold_s": 60, "gpus": "7"}, "no GPU 7"),
            ("hold", {"max_hold_s": 60, "mode": "turbo"}, "mode"),
            ("release", {"name": "nobody"}, "no keeper named 'nobody'"),
            ("release", {"name": "../../etc"}, "name"),
            ("status", {"name": "nobody"}, "no keeper named"),
            ("pause", {"name": "nobody", "seconds": -1}, "seconds"),
            ("no_such_tool", {}, "no_such_tool"),
        ]
        for tool, args, words in cases:
            err, text = await call(s, tool, **args)
            assert err, (tool, args, text)
            assert words in text, (tool, args, text)
        assert set(t.name for t in (await s.list_tools()).tools) == TOOLS

    run_session(env, body)


def test_a_keeper_ends_with_the_mcp_server_even_when_it_is_sigkilled(env: dict[str, str]) -> None:
    seen: list[tuple[int, float]] = []

    async def body(s: ClientSession) -> None:
        err, held = await call(s, "hold", gpus="0", vram="64MiB", max_hold_s=600)
        assert not err, held
        status = (await call(s, "status", name=held["name"]))[1]["keepers"][0]
        seen.extend(_tree(status))
        server = psutil.Process(status["supervisor"]["pid"]).ppid()
        os.kill(server, signal.SIGKILL)
        killed.append(server)

    killed: list[int] = []
    try:
        try:
            run_session(env, body)
        except Exception:  # the session may break with its server: that is the point here
            if not killed:
                raise
        assert killed
        wait_until(lambda: not any(alive(k) for k in seen), timeout=20)
    finally:
        _kill(seen)


def test_the_time_limit_ends_the_keeper(env: dict[str, str]) -> None:
    seen: list[tuple[int, float]] = []

    async def body(s: ClientSession) -> None:
        err, held = await call(s, "hold", gpus="0", vram="64MiB", max_hold_s=2)
        assert not err, held
        assert 0 < held["ends_in_s"] <= 2
        seen.extend(_tree((await call(s, "status", name=held["name"]))[1]["keepers"][0]))
        deadline = time.monotonic() + 20
        while any(alive(k) for k in seen) and time.monotonic() < deadline:
            await anyio.sleep(0.1)
        assert not any(alive(k) for k in seen)
        err, st = await call(s, "status")
        assert st["keepers"] == []

    try:
        run_session(env, body)
    finally:
        _kill(seen)


def test_the_keeper_itself_is_given_the_time_limit(env: dict[str, str], runtime_dir: Path
                                                   ) -> None:
    async def body(s: ClientSession) -> None:
        err, held = await call(s, "hold", gpus="0", vram="64MiB", max_hold_s=300)
        assert not err, held
        pid = (await call(s, "status", name=held["name"]))[1]["keepers"][0]["supervisor"]["pid"]
        argv = psutil.Process(pid).cmdline()
        assert argv[argv.index("--max-hold") + 1] == "300"
        assert not (await call(s, "release", name=held["name"]))[0]

    run_session(env, body)


def test_yield_for_frees_then_holds_again(env: dict[str, str]) -> None:
    async def body(s: ClientSession) -> None:
        err, held = await call(s, "hold", gpus="0", vram="64MiB", max_hold_s=60)
        assert not err, held
        name = held["name"]
        err, res = await call(s, "yield_for", name=name, seconds=2)
        assert not err, res
        gpu = (await call(s, "status", name=name))[1]["keepers"][0]["gpus"][0]
        assert not gpu["held_bytes"], gpu  # the reply comes once memory is free
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            gpu = (await call(s, "status", name=name))[1]["keepers"][0]["gpus"][0]
            if gpu["state"] == "holding" and gpu["held_bytes"]:
                break
            await anyio.sleep(0.1)
        assert gpu["state"] == "holding" and gpu["held_bytes"] == 64 * 1024**2
        assert not (await call(s, "release", name=name))[0]

    run_session(env, body)


def test_without_the_sdk_keepgpu_mcp_says_so_in_one_line(tmp_path: Path) -> None:
    import subprocess

    blocker = tmp_path / "mcp"  # a package named mcp that cannot be imported
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('no mcp here')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    proc = subprocess.run([sys.executable, "-m", "keepgpu.mcp"], env=env, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 78
    assert proc.stderr.strip().splitlines() == [
        "keepgpu-mcp: error: the MCP SDK is not installed: pip install 'keepgpu[mcp]'"]
