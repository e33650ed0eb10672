"""`keepgpu-supervise --detach` progress (issue 11, item 5): while GPUs start, a line per GPU as
it holds once the start takes more than ~1 s, a failing GPU's reason at once, and the one
summary line on stdout with the exit codes as before."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from kgtest import CTL, SUPERVISE, alive, proc_key

from keepgpu.cli.common import Exit
from keepgpu.cli.detach import progress_line, wait_for_daemon


def _detach(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SUPERVISE, "--name", name, "--detach", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def _stop(name: str, env: dict[str, str], out: subprocess.CompletedProcess[str]) -> None:
    subprocess.run([*CTL, "--name", name, "stop"], env=env, capture_output=True, timeout=30)
    found = re.search(r" pid (\d+):", out.stdout)
    if found:  # whatever the stop did, leave no daemon behind
        key = proc_key(int(found.group(1)))
        if key and alive(key):
            os.kill(key[0], signal.SIGKILL)


def test_slow_start_prints_a_line_per_gpu_as_it_holds(base_env: dict[str, str]) -> None:
    env = {**base_env, "KEEPGPU_FAKE_START_DELAY": "1:2.5"}
    out = _detach("dslow", env, "--gpus", "0,1")
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        lines = out.stderr.splitlines()
        assert sorted(line.split(":")[0] for line in lines) == ["GPU 0", "GPU 1"], out.stderr
        assert all(re.fullmatch(r"GPU \d: holding \(pid \d+\)", line) for line in lines)
        assert lines[-1].startswith("GPU 1"), "GPU 1 held last (its start is slow)"
        assert out.stdout.splitlines() == [out.stdout.strip()], "stdout: the summary alone"
        assert "2/2 GPU(s) holding" in out.stdout
    finally:
        _stop("dslow", env, out)


def test_a_failing_gpu_prints_its_reason_and_the_exit_code_says_so(base_env: dict[str, str]
                                                                    ) -> None:
    env = {**base_env, "KEEPGPU_FAKE_EXIT_CONFIG": "1:1"}
    out = _detach("dfail", env, "--gpus", "0,1")
    try:
        assert out.returncode == 1, out.stdout + out.stderr
        assert "GPU 1: fatal (config): fake device 1 does not exist (test fault)" in out.stderr
        assert "1/2 GPU(s) holding" in out.stdout and len(out.stdout.splitlines()) == 1
        assert "Traceback" not in out.stderr
    finally:
        _stop("dfail", env, out)


def _pipe_with(lines: list[tuple[float, dict[str, object]]]) -> int:
    """A read end that yields each (delay, JSON object) in turn, as the daemon would."""
    read_fd, write_fd = os.pipe()

    def write() -> None:
        with os.fdopen(write_fd, "w") as fh:
            for delay, obj in lines:
                time.sleep(delay)
                fh.write(json.dumps(obj) + "\n")
                fh.flush()

    threading.Thread(target=write, daemon=True).start()
    return read_fd


FINAL = {"name": "x", "pid": 1, "endpoint": "ipc://x", "states": ["holding", "fatal"]}
HOLD0 = {"progress": {"gpu": 0, "state": "holding", "pid": 11}}
FATAL1 = {"progress": {"gpu": 1, "state": "fatal", "reason": "config", "error": "no GPU 1"}}


def test_a_quick_start_prints_failures_only() -> None:
    shown: list[str] = []
    code, line = wait_for_daemon(_pipe_with([(0, HOLD0), (0, FATAL1), (0.1, FINAL)]), 10,
                                 Path("/x.log"), shown.append)
    assert shown == ["GPU 1: fatal (config): no GPU 1"]
    assert code == 1 and "1/2 GPU(s) holding" in line


def test_holding_lines_come_once_the_start_takes_over_a_second() -> None:
    shown: list[str] = []
    started = time.monotonic()
    seen_at: list[float] = []

    def show(text: str) -> None:
        shown.append(text)
        seen_at.append(time.monotonic() - started)

    code, _ = wait_for_daemon(_pipe_with([(0, HOLD0), (2.0, FINAL)]), 10, Path("/x.log"), show)
    assert shown == ["GPU 0: holding (pid 11)"]
    assert 0.9 <= seen_at[0] < 1.9, "printed at the ~1 s mark, before the start ended"
    assert code == 1


def test_a_restart_during_start_says_why_and_when() -> None:
    line = progress_line({"gpu": 0, "state": "restarting", "restarts": 1, "restart_in_s": 0.9,
                          "error": "worker exited (exit code 3) before READY"})
    assert line == ("GPU 0: start failed: worker exited (exit code 3) before READY; "
                    "restart 1 in 0.9s")


def test_the_daemon_dying_during_start_is_one_error() -> None:
    with pytest.raises(Exit) as caught:
        wait_for_daemon(_pipe_with([(0, HOLD0)]), 10, Path("/x.log"), lambda _: None)
    assert caught.value.code == 1 and "exited during start" in str(caught.value.message)
