"""`with keepgpu.hold(...)` from Python."""

from __future__ import annotations

import os

import psutil
import pytest

import keepgpu
from keepgpu.context import HoldError


def test_hold_holds_inside_the_block_and_releases_after(base_env, monkeypatch):
    for key, value in base_env.items():
        monkeypatch.setenv(key, value)
    with keepgpu.hold(gpus=[0, 1], vram="256MiB", engine="fake", heartbeat=0.2) as client:
        gpus = client.call("status")["gpus"]
        assert [g["state"] for g in gpus] == ["holding", "holding"]
        assert all(g["held_bytes"] == 256 * 1024**2 for g in gpus)
        pids = [g["pid"] for g in gpus]
        sup_pid = client.call("ping")["pid"]
        assert sup_pid == psutil.Process(pids[0]).ppid()
        assert psutil.Process(sup_pid).ppid() == os.getpid()
    assert not psutil.pid_exists(sup_pid) or psutil.Process(sup_pid).status() == "zombie"
    assert not any(psutil.pid_exists(p) for p in pids)


def test_hold_raises_when_the_keeper_cannot_start(base_env, monkeypatch):
    for key, value in base_env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(HoldError, match="keeper exited 78"), keepgpu.hold(gpus="9", engine="fake"):
        pass
