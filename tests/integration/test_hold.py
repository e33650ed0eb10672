"""`with keepgpu.hold(...)` from Python: real keepers, real workers, fake engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from kgtest import alive, proc_key, wait_until

import keepgpu
from keepgpu.client import Client
from keepgpu.context import HoldError

FAST = {"engine": "fake", "heartbeat": 0.2, "join_timeout": 1, "kill_timeout": 1}


@pytest.fixture
def env(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in base_env.items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("KEEPGPU_") and k not in base_env]:
        monkeypatch.delenv(key)
    return base_env


def _keeper(client: Client) -> tuple[tuple[int, float], list[tuple[int, float]], str]:
    """(supervisor key, worker keys, name) of the keeper behind `client`."""
    status = client.call("status")
    sup = proc_key(status["supervisor"]["pid"])
    workers = [proc_key(g["pid"]) for g in status["gpus"]]
    assert sup is not None and all(workers)
    return sup, workers, status["supervisor"]["name"]  # type: ignore[return-value]


def _kill_leftovers(keys: list[tuple[int, float]]) -> None:
    for key in keys:
        if alive(key):
            os.kill(key[0], signal.SIGKILL)


def test_hold_holds_inside_the_block_and_releases_after(env: dict[str, str]) -> None:
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


def test_the_keeper_logs_to_a_file_and_leaves_no_files_after_a_clean_release(
    env: dict[str, str], runtime_dir: Path
) -> None:
    with keepgpu.hold(gpus=[0], vram="256MiB", **FAST) as client:
        sup, workers, name = _keeper(client)
        log = runtime_dir / f"{name}.log"
        # Not a pipe that nobody reads: supervisor and worker write to the log file.
        for key in (sup, *workers):
            assert os.readlink(f"/proc/{key[0]}/fd/2") == str(log)
        assert "state=holding" in log.read_text()
    assert not [p for p in runtime_dir.iterdir() if p.name.startswith(name)]


def test_hold_raises_when_the_keeper_cannot_start(env: dict[str, str]) -> None:
    with pytest.raises(HoldError, match="keeper exited 78: .*no GPU 9"), \
            keepgpu.hold(gpus="9", engine="fake"):
        pass


def test_hold_error_carries_each_gpus_reason(env: dict[str, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPGPU_FAKE_MEM_TOTAL", "1GiB")
    with pytest.raises(HoldError) as caught, keepgpu.hold(gpus=[0, 1], vram="2GiB", **FAST):
        pass
    text = str(caught.value)
    # Either the keeper is seen exiting (every GPU fatal: exit 4), or hold() sees both GPUs
    # fatal first: the first line says which, the reasons follow in both cases.
    assert text.startswith(("keeper exited 4: every GPU is fatal",
                            "2 of 2 GPU(s) could not be held")), text
    for gpu in (0, 1):
        assert f"GPU {gpu}: --vram 2147483648 bytes exceeds the device's 1073741824 bytes" in text
    assert set(caught.value.reasons) == {0, 1}
    assert "[" not in text.splitlines()[0]  # plain words, not a Python list


def test_hold_error_names_the_one_gpu_that_failed_and_releases_the_rest(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEPGPU_FAKE_EXIT_CONFIG", "1:1")  # device 1 only
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(HoldError) as caught, keepgpu.hold(gpus=[0, 1], vram="256MiB", **FAST):
        pass
    assert str(caught.value).splitlines()[:2] == [
        "1 of 2 GPU(s) could not be held",
        "GPU 1: fake device 1 does not exist (test fault)",
    ]
    assert caught.value.log is not None and caught.value.log.exists()  # kept for reading
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left, "the keeper of a failed hold must be gone"


def test_a_body_that_raises_still_releases(env: dict[str, str]) -> None:
    keys: list[tuple[int, float]] = []
    with pytest.raises(ZeroDivisionError), \
            keepgpu.hold(gpus=[0, 1], vram="256MiB", **FAST) as client:
        sup, workers, _ = _keeper(client)
        keys = [sup, *workers]
        _ = 1 / 0
    try:
        assert not any(alive(k) for k in keys)
    finally:
        _kill_leftovers(keys)


def test_nested_holds_are_independent(env: dict[str, str]) -> None:
    with keepgpu.hold(gpus=[0], vram="256MiB", **FAST) as outer:
        o_sup, o_workers, o_name = _keeper(outer)
        with keepgpu.hold(gpus=[1], vram="256MiB", **FAST) as inner:
            i_sup, i_workers, i_name = _keeper(inner)
            assert i_name != o_name and i_sup != o_sup
            gpus = inner.call("status")["gpus"]  # its own GPU, not the outer's
            assert [(g["device_entry"], g["state"]) for g in gpus] == [("1", "holding")]
        assert not alive(i_sup) and not any(alive(k) for k in i_workers)
        gpus = outer.call("status")["gpus"]  # the outer keeper still holds
        assert [(g["device_entry"], g["state"]) for g in gpus] == [("0", "holding")]
        assert alive(o_sup) and all(alive(k) for k in o_workers)
    assert not alive(o_sup)


def test_two_threads_hold_at_once(env: dict[str, str]) -> None:
    both_holding = threading.Barrier(2, timeout=60)
    seen: dict[int, Any] = {}
    errors: list[BaseException] = []

    def worker(gpu: int) -> None:
        try:
            with keepgpu.hold(gpus=[gpu], vram="256MiB", **FAST) as client:
                seen[gpu] = _keeper(client)
                both_holding.wait()  # both keepers hold at the same time
                seen[gpu] += (client.call("status")["gpus"][0]["state"],)
                both_holding.wait()
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)
            both_holding.abort()

    threads = [threading.Thread(target=worker, args=(g,)) for g in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert seen[0][0] != seen[1][0] and seen[0][2] != seen[1][2]
    assert seen[0][3] == seen[1][3] == "holding"
    assert not any(alive(s[0]) for s in seen.values())


_CALLER = """
import json, sys, time, keepgpu
opts = json.loads(sys.argv[1])
with keepgpu.hold(gpus=[0, 1], vram="256MiB", **opts) as client:
    status = client.call("status")
    print(json.dumps({"sup": status["supervisor"]["pid"],
                      "workers": [g["pid"] for g in status["gpus"]]}), flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("stubborn", [False, True], ids=["clean", "workers-ignore-stop"])
def test_the_keeper_ends_when_its_caller_is_sigkilled(env: dict[str, str], stubborn: bool
                                                      ) -> None:
    child_env = {**env, **({"KEEPGPU_FAKE_IGNORE_STOP": "1"} if stubborn else {})}
    caller = subprocess.Popen(
        [sys.executable, "-c", _CALLER, json.dumps(FAST)], env=child_env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )
    keys: list[tuple[int, float]] = []
    try:
        assert caller.stdout is not None
        ready = json.loads(caller.stdout.readline())
        keys = [k for k in (proc_key(p) for p in [ready["sup"], *ready["workers"]]) if k]
        assert len(keys) == 3 and all(alive(k) for k in keys)
        caller.kill()
        caller.wait(10)
        started = time.monotonic()
        bound = FAST["join_timeout"] + FAST["kill_timeout"] + 5
        wait_until(lambda: not any(alive(k) for k in keys), bound)
        assert time.monotonic() - started < bound
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(10)
        _kill_leftovers(keys)
        if caller.stdout is not None:
            caller.stdout.close()
