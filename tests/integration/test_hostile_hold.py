"""`keepgpu.hold()` used carelessly: a forked child leaving the with-block, a caller that
os._exit()s inside it, a log file that is a FIFO."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kgtest import alive, proc_key, wait_until

import keepgpu
from keepgpu.context import HoldError

FAST = {"engine": "fake", "heartbeat": 0.2, "join_timeout": 1, "kill_timeout": 1}

# The child of a fork() inside the block unwinds through the with-block (sys.exit, or any
# return in code that forks and does not exec). It must not release its parent's keeper.
_FORKER = """
import json, os, sys, keepgpu
with keepgpu.hold(gpus=[0], vram="64MiB", **json.loads(sys.argv[1])) as client:
    sup = client.call("ping")["pid"]
    child = os.fork()
    if child == 0:
        sys.exit(0)
    os.waitpid(child, 0)
    try:
        states = [g["state"] for g in client.call("status", timeout=5)["gpus"]]
    except Exception as exc:
        states = [repr(exc)]
    print(json.dumps({"sup": sup, "states": states}), flush=True)
"""

# A caller that ends inside the block without unwinding (os._exit, as multiprocessing does).
_EXITER = """
import json, os, sys, keepgpu
with keepgpu.hold(gpus=[0], vram="64MiB", **json.loads(sys.argv[1])) as client:
    status = client.call("status")
    print(json.dumps({"sup": status["supervisor"]["pid"],
                      "name": status["supervisor"]["name"],
                      "workers": [g["pid"] for g in status["gpus"]]}), flush=True)
    os._exit(0)
"""


@pytest.fixture
def env(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in base_env.items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("KEEPGPU_") and k not in base_env]:
        monkeypatch.delenv(key)
    return base_env


def _run(script: str, env: dict[str, str]) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(FAST)], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[0])  # type: ignore[no-any-return]


def test_a_forked_child_leaving_the_block_does_not_release_the_parents_keeper(
    env: dict[str, str], runtime_dir: Path
) -> None:
    out = _run(_FORKER, env)
    assert out["states"] == ["holding"]
    # And the parent's own release still cleans up everything.
    assert not [p.name for p in runtime_dir.iterdir() if p.name.startswith("hold-")]


def test_a_caller_that_os_exits_in_the_block_leaves_only_the_keepers_log(
    env: dict[str, str], runtime_dir: Path
) -> None:
    """Its keeper ends with it (--exit-with). Each such caller used to leave `<name>.lock`
    behind for ever (one per hold: names are unique); the log is kept on purpose."""
    caller = subprocess.Popen([sys.executable, "-c", _EXITER, json.dumps(FAST)], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    keys: list[tuple[int, float]] = []
    try:
        assert caller.stdout is not None
        out = json.loads(caller.stdout.readline())
        keys = [k for k in (proc_key(p) for p in [out["sup"], *out["workers"]]) if k]
        caller.wait(10)
        wait_until(lambda: not any(alive(k) for k in keys), 15)
        left = sorted(p.name for p in runtime_dir.iterdir() if p.name.startswith(out["name"]))
        assert left == [f"{out['name']}.log"]
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(10)
        for key in keys:
            if alive(key):
                os.kill(key[0], signal.SIGKILL)
        if caller.stdout is not None:
            caller.stdout.close()


def test_a_fifo_as_log_file_is_a_hold_error_not_a_hang(env: dict[str, str],
                                                       tmp_path: Path) -> None:
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo, 0o600)
    started = time.monotonic()
    with pytest.raises(HoldError, match="keeper log"), \
            keepgpu.hold(gpus=[0], vram="64MiB", log_file=str(fifo), **FAST):
        pass
    assert time.monotonic() - started < 10
