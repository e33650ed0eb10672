"""`with keepgpu.hold(...)`: hold GPUs for the duration of a block of Python code.

Starts a supervisor as a child process (its own name, so it never collides with a keeper you
started by hand), waits until every GPU holds, and releases everything when the block ends,
within the join and kill timeouts. Every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from keepgpu.client import Client, CommandFailed, NoSupervisor, endpoint_for


class HoldError(RuntimeError):
    """The keeper could not be started or did not reach `holding` in time."""


def _argv(name: str, gpus: str, vram: str, options: dict[str, Any]) -> list[str]:
    argv = [sys.executable, "-m", "keepgpu.cli.supervise", "--name", name,
            "--gpus", gpus, "--vram", vram]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


@contextmanager
def hold(
    gpus: str | list[int] = "all",
    vram: str = "1GiB",
    *,
    name: str | None = None,
    start_timeout: float = 120.0,
    **options: Any,
) -> Iterator[Client]:
    """Hold `gpus` (like `--gpus`) with `vram` each while the block runs; yields a Client.

    Other keyword arguments are `keepgpu-supervise` options (`engine="fake"`, `mode="pstate"`,
    `target_util=20`...). Raises HoldError when the keeper cannot start or some GPU does not
    hold within `start_timeout` seconds.
    """
    spec = ",".join(str(g) for g in gpus) if isinstance(gpus, list) else gpus
    name = name or f"hold-{os.getpid()}"
    proc = subprocess.Popen(
        _argv(name, spec, vram, options),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    client = Client(endpoint_for(name), timeout=5.0)
    try:
        _wait_holding(proc, client, start_timeout)
        yield client
    finally:
        _release(proc, client)


def _wait_holding(proc: subprocess.Popen[bytes], client: Client, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise HoldError(f"keeper exited {proc.returncode}: {err.splitlines()[-1:] or ''}")
        try:
            states = [g["state"] for g in client.call("status", timeout=1.0)["gpus"]]
        except NoSupervisor:
            states = []
        if states and all(s in ("holding", "backoff") for s in states):
            return
        if "fatal" in states:
            raise HoldError(f"some GPU could not be held: {states}")
        time.sleep(0.1)
    raise HoldError(f"GPUs not holding within {timeout:g}s")


def _release(proc: subprocess.Popen[bytes], client: Client) -> None:
    if proc.poll() is None:
        try:
            client.call("stop", timeout=30.0)
        except (NoSupervisor, CommandFailed):
            proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if proc.stderr is not None:
        proc.stderr.close()
    client.close()
