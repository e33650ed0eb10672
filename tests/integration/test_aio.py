"""keepgpu.aio: the async client, hold() and yielded() against real keepers (fake engine)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from kgtest import Sup, alive, proc_key

from keepgpu import aio
from keepgpu.client import CommandFailed, NoSupervisor
from keepgpu.context import HoldError

FAST = {"engine": "fake", "heartbeat": 0.2, "join_timeout": 1, "kill_timeout": 1}


@pytest.fixture
def env(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in base_env.items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("KEEPGPU_") and k not in base_env]:
        monkeypatch.delenv(key)
    return base_env


async def _with_ticker(body: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
    """Run `body` while a task ticks every 10 ms: (its result, the longest gap between ticks),
    i.e. how long the event loop was stalled."""
    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        result = await body()
    finally:
        ticker.cancel()
    ticks.append(time.monotonic())
    return result, max(b - a for a, b in zip(ticks, ticks[1:], strict=False))


def test_hold_holds_and_releases_without_stalling_the_loop(env: dict[str, str],
                                                           runtime_dir: Path) -> None:
    seen: list[tuple[int, float]] = []

    async def body() -> float:
        started = time.monotonic()
        async with aio.hold(gpus=[0, 1], vram="128MiB", **FAST) as client:
            took = time.monotonic() - started
            status = await client.call("status")
            assert [g["state"] for g in status["gpus"]] == ["holding", "holding"]
            assert all(g["held_bytes"] == 128 * 1024**2 for g in status["gpus"])
            sup = status["supervisor"]["pid"]
            assert psutil.Process(sup).ppid() == os.getpid()
            seen.extend(k for k in (proc_key(p) for p in
                                    [sup, *(g["pid"] for g in status["gpus"])]) if k)
        return took

    try:
        took, stall = asyncio.run(_with_ticker(body))
        assert not any(alive(k) for k in seen)
        assert list(runtime_dir.iterdir()) == []  # an own name leaves no files
        # Starting a keeper takes its workers' start (here well over the gap): a blocking
        # hold() would have stalled the loop all along.
        assert took > 0.3
        assert stall < took / 2, (stall, took)
    finally:
        for key in seen:
            if alive(key):
                os.kill(key[0], 9)


def test_a_slow_stop_does_not_stall_the_loop(start_sup: Callable[..., Sup]) -> None:
    sup = start_sup("--gpus", "0", "--heartbeat", "0.2", "--join-timeout", "2",
                    "--kill-timeout", "1", env={"KEEPGPU_FAKE_IGNORE_STOP": "1"})
    sup.wait_states("holding")

    async def body() -> dict[str, Any]:
        async with aio.AsyncClient(sup.endpoint) as client:
            return await client.call("stop", timeout=10)

    result, stall = asyncio.run(_with_ticker(body))
    assert result["gpus"][0]["outcome"] == "killed"  # the worker ignored STOP: a 2 s join
    assert stall < 1.0, stall  # a blocking call would stall the loop for the whole 2 s


def test_errors_are_the_clients_errors(start_sup: Callable[..., Sup], runtime_dir: Path) -> None:
    sup = start_sup("--gpus", "0", "--heartbeat", "0.2")
    sup.wait_states("holding")

    async def body() -> None:
        async with aio.AsyncClient(sup.endpoint) as client:
            with pytest.raises(CommandFailed) as info:
                await client.call("pause", {"seconds": -1})
            assert info.value.code == "invalid_argument"
            with pytest.raises(CommandFailed) as info:
                await client.call("no-such-command")
            assert info.value.code == "unknown_command"
            assert (await client.call("ping"))["pid"] == sup.pid  # still usable after errors
        missing = aio.AsyncClient(f"ipc://{runtime_dir}/nobody.ctl", timeout=0.5)
        with pytest.raises(NoSupervisor):
            await missing.call("ping")
        stale = runtime_dir / "stale.ctl"
        stale.touch()  # a socket file nobody serves: bounded by the timeout
        started = time.monotonic()
        with pytest.raises(NoSupervisor):
            await aio.AsyncClient(f"ipc://{stale}", timeout=0.5).call("ping")
        assert time.monotonic() - started < 3

    asyncio.run(body())


def test_hold_raises_hold_error_with_the_keepers_reason(env: dict[str, str]) -> None:
    async def body() -> None:
        with pytest.raises(HoldError) as info:
            async with aio.hold(gpus=[9], vram="64MiB", **FAST):
                raise AssertionError("the block must not run")
        assert "no GPU 9" in str(info.value)

    asyncio.run(body())


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


def test_yielded_frees_the_gpu_for_the_block_and_holds_again(start_sup: Callable[..., Sup]
                                                            ) -> None:
    sup = start_sup("--gpus", "0", "--heartbeat", "0.2", "--join-timeout", "1")
    sup.wait_states("holding")

    async def body() -> None:
        async with aio.yielded(endpoint=sup.endpoint):
            gpu = sup.gpus()[0]
            assert not gpu["held_bytes"], gpu  # memory is free inside the block
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            gpu = sup.gpus()[0]
            if gpu["state"] == "holding" and gpu["held_bytes"]:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"not held again: {gpu}")

    asyncio.run(body())
