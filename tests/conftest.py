"""Shared fixtures: real supervisor processes in a private runtime dir, cleaned up by pid. The
helpers they use (Sup, wait_until, proc_key, alive) live in kgtest.py."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kgtest import CTL, SUPERVISE, Sup, alive, proc_key, wait_until

__all__ = ["CTL", "SUPERVISE", "Sup", "alive", "proc_key", "wait_until"]


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    # Short path on purpose: ipc socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="kg", dir="/tmp"))
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def base_env(runtime_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEPGPU_", "CUDA_", "ROCR_"))}
    env["KEEPGPU_RUNTIME_DIR"] = str(runtime_dir)
    env["KEEPGPU_ENGINE"] = "fake"
    env["KEEPGPU_KEYS_DIR"] = str(runtime_dir / "keys")  # never the real ~/.config/keepgpu
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def start_sup(runtime_dir: Path, base_env: dict[str, str]) -> Iterator[Callable[..., Sup]]:
    """start_sup(*args, env={...}, name=None) -> Sup; every supervisor is cleaned up by pid."""
    started: list[Sup] = []

    def start(*args: str, env: dict[str, str] | None = None, name: str | None = None) -> Sup:
        full_env = {**base_env, **(env or {})}
        sup = Sup(runtime_dir, name or f"t{uuid.uuid4().hex[:8]}", list(args), full_env)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.cleanup()

