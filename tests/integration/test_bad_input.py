"""Bad input at every edge: one stderr line, the documented exit code, no traceback, and for
--detach no daemon left behind (keepgpu issue 9). One case per reported repro."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
from kgtest import CTL, SUPERVISE, Sup, wait_until

HUGE = "1" * 400


def run(argv: list[str], env: dict[str, str], timeout: float = 60, cwd: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, stdin=subprocess.DEVNULL)


def assert_one_line(out: subprocess.CompletedProcess[str], code: int) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code, (out.returncode, out.stderr)
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


def assert_none_left(name: str) -> None:
    """No process of supervisor `name`; any found (a regression) is killed by pid first, its
    workers following by PR_SET_PDEATHSIG."""
    left = processes_named(name)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert left == []


def processes_named(name: str) -> list[int]:
    """Pids of keepgpu processes started with `--name name` (our names are unique per test)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "--name" in cmd and name in cmd and proc.info["pid"] != os.getpid():
            found.append(proc.info["pid"])
    return found


# (extra argv, environment, exit code, text the one line must contain)
SUPERVISE_CASES = [
    pytest.param(["--target-util", "nan"], {}, 2, "--target-util", id="target-util-nan"),
    pytest.param(["--max-temp", "nan"], {}, 2, "--max-temp", id="max-temp-nan"),
    pytest.param(["--busy-threshold", "inf"], {}, 2, "--busy-threshold", id="busy-inf"),
    pytest.param(["--hang-timeout", "inf"], {}, 2, "--hang-timeout", id="hang-timeout-inf"),
    pytest.param(["--restart-delay", "inf"], {}, 2, "--restart-delay", id="restart-delay-inf"),
    pytest.param(["--start-timeout", "1e300"], {}, 2, "--start-timeout", id="start-timeout-huge"),
    pytest.param(["--vram", HUGE], {}, 2, "too large", id="vram-400-digits"),
    pytest.param([], {"KEEPGPU_VRAM": "0"}, 2, "KEEPGPU_VRAM", id="env-vram-named"),
    pytest.param([], {"KEEPGPU_TARGET_UTIL": "nan"}, 2, "KEEPGPU_TARGET_UTIL", id="env-util"),
    pytest.param([], {"KEEPGPU_FAKE_CRASH_AFTER": "soon"}, 78, "KEEPGPU_FAKE_CRASH_AFTER",
                 id="fake-crash-garbage"),
    pytest.param([], {"KEEPGPU_FAKE_HANG_AFTER": "0/x:1"}, 78, "KEEPGPU_FAKE_HANG_AFTER",
                 id="fake-hang-bad-incarnation"),
    pytest.param([], {"KEEPGPU_FAKE_IGNORE_STOP": "yes"}, 78, "KEEPGPU_FAKE_IGNORE_STOP",
                 id="fake-flag-garbage"),
    pytest.param([], {"KEEPGPU_FAKE_START_DELAY": "nan"}, 78, "KEEPGPU_FAKE_START_DELAY",
                 id="fake-delay-nan"),
    pytest.param([], {"KEEPGPU_FAKE_MEM_TOTAL": "lots"}, 78, "KEEPGPU_FAKE_MEM_TOTAL",
                 id="fake-mem-garbage"),
    pytest.param([], {"KEEPGPU_FAKE_TELEMETRY": "nosuch"}, 78, "KEEPGPU_FAKE_TELEMETRY",
                 id="fake-telemetry-garbage"),
]


@pytest.mark.parametrize("detach", [False, True], ids=["fg", "detach"])
@pytest.mark.parametrize(("argv", "env", "code", "text"), SUPERVISE_CASES)
def test_supervise_refuses_bad_input(base_env, runtime_dir, argv, env, code, text, detach):
    name = f"b{uuid.uuid4().hex[:8]}"
    extra = ["--detach"] if detach else []
    out = run([*SUPERVISE, "--name", name, "--gpus", "0", *extra, *argv], {**base_env, **env})
    try:
        assert text in assert_one_line(out, code)
        # Refused up front: no daemon, no worker, no pid file.
        assert not (runtime_dir / f"{name}.pid").exists()
    finally:
        assert_none_left(name)


def test_detach_log_file_in_missing_dir_is_config_error(base_env, runtime_dir):
    name = f"b{uuid.uuid4().hex[:8]}"
    out = run([*SUPERVISE, "--name", name, "--gpus", "0", "--detach",
               "--log-file", "/nonexistent/x.log"], base_env)
    try:
        assert "/nonexistent/x.log" in assert_one_line(out, 78)
        assert not (runtime_dir / f"{name}.pid").exists()
    finally:
        assert_none_left(name)


def test_detach_relative_log_file_is_resolved_before_the_daemon_chdirs(base_env, tmp_path):
    name = f"b{uuid.uuid4().hex[:8]}"
    out = run([*SUPERVISE, "--name", name, "--gpus", "0", "--detach", "--log-file", "rel.log"],
              base_env, cwd=str(tmp_path))
    try:
        assert out.returncode == 0, out.stderr
        assert str(tmp_path / "rel.log") in out.stdout
        assert "holding" in (tmp_path / "rel.log").read_text()
    finally:
        stop = run([*CTL, "--name", name, "stop"], base_env)
        assert stop.returncode == 0, stop.stderr


# A function that hides torch from the supervisor's find_spec only, standing in for an
# interpreter without torch (the worker would still find it, but must never be started).
NO_TORCH = (
    "import importlib.util as u, sys; real = u.find_spec; "
    "u.find_spec = lambda n, *a: None if n == 'torch' else real(n, *a); "
    "sys.argv[0] = 'keepgpu-supervise'; from keepgpu.cli.supervise import main; main()"
)


@pytest.mark.parametrize("engine", ["cpu", "cuda", "auto"])
def test_torch_engine_without_torch_exits_78_at_once(base_env, runtime_dir, engine):
    name = f"b{uuid.uuid4().hex[:8]}"
    env = {**base_env, "KEEPGPU_ENGINE": engine, "CUDA_VISIBLE_DEVICES": "0"}
    t0 = time.monotonic()
    out = run([sys.executable, "-c", NO_TORCH, "--name", name, "--gpus", "0"], env)
    try:
        line = assert_one_line(out, 78)
        assert "torch" in line and "pip install" in line and "--engine fake" in line
        assert time.monotonic() - t0 < 20  # no worker start, no restarts
    finally:
        assert_none_left(name)


CTL_CASES = [
    pytest.param(["--endpoint", "garbage", "status"], {}, 78, "--endpoint", id="endpoint-garbage"),
    pytest.param(["--timeout", "nan", "status"], {}, 2, "--timeout", id="timeout-nan"),
    pytest.param(["pause", "--seconds", "1e9"], {}, 2, "--seconds", id="pause-1e9"),
    pytest.param(["pause", "--seconds", "nan"], {}, 2, "--seconds", id="pause-nan"),
    pytest.param(["pause", "--seconds", "inf"], {}, 2, "--seconds", id="pause-inf"),
    pytest.param(["set", "--target-util", "nan"], {}, 2, "--target-util", id="set-util-nan"),
    pytest.param(["set", "--vram", HUGE], {}, 2, "too large", id="set-vram-huge"),
    pytest.param(["stop", "--gpus", "0,0"], {}, 2, "twice", id="stop-duplicate-gpus"),
    pytest.param(["status", "--gpus", "1" * 5000], {}, 2, "--gpus", id="gpus-5000-digits"),
    pytest.param([], {}, 2, "missing command", id="no-command"),
    pytest.param(["status"], {"KEEPGPU_TIMEOUT": "soon"}, 2, "KEEPGPU_TIMEOUT", id="env-timeout"),
    pytest.param(["status"], {"KEEPGPU_CONTROL": "nope"}, 78, "KEEPGPU_CONTROL", id="env-control"),
    pytest.param(["status"], {"KEEPGPU_NAME": "b@d"}, 78, "KEEPGPU_NAME", id="env-name"),
]


@pytest.mark.parametrize(("argv", "env", "code", "text"), CTL_CASES)
def test_ctl_refuses_bad_input(start_sup, base_env, argv, env, code, text):
    # A live supervisor, so that a refused command is refused by the CLI, not the server.
    sup: Sup = start_sup("--gpus", "0,1")
    sup.wait_states("holding")
    # Bare `keepgpu-ctl`, and KEEPGPU_NAME, need no --name on the command line.
    name = [] if not argv or "KEEPGPU_NAME" in env else ["--name", sup.name]
    out = run([*CTL, *name, *argv], {**base_env, **env})
    assert text in assert_one_line(out, code)
    assert [g["state"] for g in sup.gpus()] == ["holding", "holding"]


def test_ctl_reads_keepgpu_name_like_supervise(start_sup, base_env):
    sup: Sup = start_sup("--gpus", "0")
    sup.wait_states("holding")
    out = run([*CTL, "ping"], {**base_env, "KEEPGPU_NAME": sup.name})
    assert out.returncode == 0, out.stderr
    assert f"pid {sup.pid}" in out.stdout
    # KEEPGPU_CONTROL is supervise's --control and ctl's --endpoint.
    out = run([*CTL, "ping"], {**base_env, "KEEPGPU_CONTROL": sup.endpoint})
    assert out.returncode == 0, out.stderr
    # A job's KEEPGPU_GPUS (meant for supervise) does not narrow `keepgpu-ctl status`.
    out = run([*CTL, "--name", sup.name, "status", "--json"], {**base_env, "KEEPGPU_GPUS": "7"})
    assert out.returncode == 0, out.stderr


def test_ctl_after_sigkilled_supervisor_answers_3_at_once(start_sup, base_env, runtime_dir):
    sup: Sup = start_sup("--gpus", "0")
    sup.wait_states("holding")
    workers = [g["pid"] for g in sup.gpus()]
    os.kill(sup.pid, signal.SIGKILL)
    sup.proc.wait(10)
    assert (runtime_dir / f"{sup.name}.ctl").exists()  # the stale socket is still there
    t0 = time.monotonic()
    out = run([*CTL, "--name", sup.name, "--timeout", "30", "status"], base_env)
    took = time.monotonic() - t0
    assert "gone" in assert_one_line(out, 3)
    assert took < 15, took  # not the whole 30 s --timeout
    wait_until(lambda: not any(psutil.pid_exists(p) for p in workers), 15)
