"""Shared test helpers: real supervisor processes (Sup), waits, process identity by pid and
create time. A module of its own, not conftest.py: tests/slurm has a conftest.py too, and a
`from conftest import ...` could then find the wrong one.

keepgpu.client needs pyzmq: its import is guarded so that tests/gpu is collected on a GPU
machine without pyzmq and skips what needs it, with a reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

try:
    from keepgpu.client import Client, NoSupervisor
except ImportError:  # no pyzmq: only tests that start a supervisor need it, and they skip
    pass

SUPERVISE = [sys.executable, "-m", "keepgpu.cli.supervise"]
CTL = [sys.executable, "-m", "keepgpu.cli.ctl"]


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll `pred` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


def proc_key(pid: int) -> tuple[int, float] | None:
    """(pid, create_time): identifies a process even if its pid is reused later."""
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def alive(key: tuple[int, float]) -> bool:
    try:
        p = psutil.Process(key[0])
        return p.create_time() == key[1] and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Sup:
    """A `keepgpu-supervise` subprocess and a client for it."""

    def __init__(self, runtime: Path, name: str, args: list[str], env: dict[str, str]) -> None:
        self.runtime = runtime
        self.name = name
        self.args = args
        self.env = env
        self.stderr_path = runtime / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in cleanup
        self.proc = subprocess.Popen(
            [*SUPERVISE, "--name", name, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        self.endpoint = f"ipc://{runtime}/{name}.ctl"
        self.client: Client = Client(self.endpoint, timeout=5.0)
        self.seen_workers: set[tuple[int, float]] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
             ) -> dict[str, Any]:
        return self.client.call(cmd, args, timeout)

    def status(self) -> dict[str, Any]:
        result = self.call("status")
        for g in result["gpus"]:
            if g["pid"]:
                key = proc_key(g["pid"])
                if key:
                    self.seen_workers.add(key)
        return result

    def gpus(self) -> list[dict[str, Any]]:
        return list(self.status()["gpus"])

    def wait_states(
        self, want: dict[int, str] | str, timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited {self.proc.returncode}:\n{self.log()}")
            try:
                gpus = self.gpus()
            except NoSupervisor:
                return None
            states = {g["gpu"]: g["state"] for g in gpus}
            if isinstance(want, str):
                ok = bool(states) and all(s == want for s in states.values())
            else:
                ok = all(states.get(k) == v for k, v in want.items())
            return gpus if ok else None

        return wait_until(check, timeout)  # type: ignore[no-any-return]

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CTL, "--name", self.name, *args], env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )

    def log(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for key in self.seen_workers:
            if alive(key):
                os.kill(key[0], signal.SIGKILL)
        self.client.close()
        self._stderr.close()
