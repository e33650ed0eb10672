"""`keepgpu-supervise --exit-with PID`: the end of a watched process releases everything."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from kgtest import SUPERVISE, Sup, alive, proc_key


@pytest.mark.parametrize("via", ["option", "env"])
def test_the_supervisor_releases_and_exits_when_the_watched_pid_ends(
    start_sup: Callable[..., Sup], via: str
) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        args = ["--gpus", "0,1", "--join-timeout", "1", "--kill-timeout", "1"]
        if via == "option":
            sup = start_sup(*args, "--exit-with", str(sleeper.pid))
        else:
            sup = start_sup(*args, env={"KEEPGPU_EXIT_WITH": str(sleeper.pid)})
        gpus = sup.wait_states("holding")
        workers = [proc_key(g["pid"]) for g in gpus]
        time.sleep(0.5)
        assert sup.proc.poll() is None  # still holding while the watched process lives
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait(10)
        assert sup.proc.wait(1 + 1 + 5) == 0
        assert not any(k and alive(k) for k in workers)
        assert f"watched pid {sleeper.pid} ended: releasing every GPU" in sup.log()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait(10)


def test_exit_with_a_pid_that_does_not_exist_is_a_config_error(
    base_env: dict[str, str]
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    out = subprocess.run([*SUPERVISE, "--name", "x", "--exit-with", str(gone.pid)],
                         env=base_env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 78
    assert out.stderr.strip() == (f"keepgpu-supervise: error: --exit-with {gone.pid}: "
                                  "no such process")


def test_exit_with_must_be_a_pid(base_env: dict[str, str]) -> None:
    out = subprocess.run([*SUPERVISE, "--exit-with", "0"], env=base_env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "--exit-with" in out.stderr
