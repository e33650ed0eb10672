"""CLI input errors: one clear line on stderr, the design's exit code, no traceback."""

from __future__ import annotations

import os
import subprocess

import pytest
from kgtest import CTL, SUPERVISE


def run(cmd, env, timeout=30):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--gpus", ""], 78, "empty"),
        (["--gpus", "0,,1"], 78, "empty entry"),
        (["--gpus", "0,0"], 78, "twice"),
        (["--gpus", "7"], 78, "no GPU 7"),
        (["--gpus", "GPU-nope"], 78, "unknown GPU id"),
        (["--vram", "0"], 2, "at least 1 byte"),
        (["--vram", "10XB"], 2, "unknown size unit"),
        (["--vram", "150%"], 2, "percent"),
        (["--vram", "lots"], 2, "not a size"),
        (["--join-timeout", "-1"], 2, "positive"),
        (["--kill-timeout", "0"], 2, "positive"),
        (["--hang-timeout", "abc"], 2, "hang-timeout"),
        (["--heartbeat", "5", "--hang-timeout", "6"], 2, "twice --heartbeat"),
        (["--engine", "tpu"], 2, "engine"),
        (["--name", "../evil"], 78, "invalid name"),
        (["--name", "x" * 60 + "y"], 78, "107-byte"),
        (["--control", "tcp://127.0.0.1:5555/x"], 78, "nothing after it"),
        (["--control", "udp://127.0.0.1:1"], 78, "ipc://"),
        (["--no-such-flag"], 2, "no-such-flag"),
    ],
)
def test_supervise_bad_input(base_env, runtime_dir, args, code, words):
    env = dict(base_env)
    if "107-byte" in words:
        env["KEEPGPU_RUNTIME_DIR"] = str(runtime_dir / ("d" * 40))
    out = run([*SUPERVISE, *args], env)
    assert out.returncode == code, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert words in lines[0]
    assert "Traceback" not in out.stderr


def test_unusable_runtime_dir_is_a_config_error(base_env, runtime_dir):
    bad = runtime_dir / "open"
    bad.mkdir(mode=0o777)
    bad.chmod(0o777)
    out = run([*SUPERVISE], {**base_env, "KEEPGPU_RUNTIME_DIR": str(bad)})
    assert out.returncode == 78 and "must be 700" in out.stderr
    link = runtime_dir / "link"
    link.symlink_to(runtime_dir)
    out = run([*SUPERVISE], {**base_env, "KEEPGPU_RUNTIME_DIR": str(link)})
    assert out.returncode == 78 and "symlink" in out.stderr


def test_auto_engine_without_a_gpu_names_the_alternatives(base_env):
    env = {**base_env, "KEEPGPU_ENGINE": "auto"}
    out = run([*SUPERVISE], env)
    assert out.returncode == 78
    assert "--engine cpu" in out.stderr and "--engine fake" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_options_come_from_the_environment(base_env):
    out = run([*SUPERVISE], {**base_env, "KEEPGPU_GPUS": "0,0"})
    assert out.returncode == 78 and "twice" in out.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["status", "--gpus", "0,,1"], 2),
        (["pause", "--seconds", "-5"], 2),
        (["set"], 2),
        (["set", "--vram", "10XB"], 2),
        (["--timeout", "-1", "ping"], 2),
        (["frobnicate"], 2),
        (["--name", "../x", "ping"], 78),
    ],
)
def test_ctl_bad_input(base_env, args, code):
    out = run([*CTL, *args], base_env)
    assert out.returncode == code, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_detach_returns_once_holding_and_reports(base_env, runtime_dir):
    out = run([*SUPERVISE, "--name", "bg", "--gpus", "0,1", "--detach"], base_env)
    try:
        assert out.returncode == 0, out.stderr
        assert "2/2 GPU(s) holding" in out.stdout
        status = run([*CTL, "--name", "bg", "status", "--json"], base_env)
        assert status.returncode == 0
        assert '"holding"' in status.stdout
        assert (runtime_dir / "bg.log").exists()
    finally:
        stop = run([*CTL, "--name", "bg", "stop"], base_env)
    assert stop.returncode == 0 and "supervisor exited" in stop.stdout


def test_detach_reports_all_fatal_with_exit_4(base_env):
    env = {**base_env, "KEEPGPU_FAKE_EXIT_CONFIG": "1"}
    out = run([*SUPERVISE, "--name", "bgf", "--gpus", "0", "--detach"], env)
    assert out.returncode == 4, out.stdout + out.stderr
    assert "0/1 GPU(s) holding" in out.stdout


def test_detach_second_instance_is_refused(base_env):
    first = run([*SUPERVISE, "--name", "bg2", "--gpus", "0", "--detach"], base_env)
    try:
        assert first.returncode == 0
        second = run([*SUPERVISE, "--name", "bg2", "--gpus", "0", "--detach"], base_env)
        assert second.returncode == 1 and "already running" in second.stderr
    finally:
        run([*CTL, "--name", "bg2", "stop"], base_env)


def test_json_logs_one_object_per_line_with_state_changes(start_sup):
    import json

    sup = start_sup("--gpus", "0", "--log-format", "json", "--heartbeat", "0.2")
    sup.wait_states("holding")
    sup.call("stop", timeout=15)
    sup.proc.wait(10)
    records = [json.loads(line) for line in sup.log().splitlines() if line.startswith("{")]
    messages = [r["msg"] for r in records if r["logger"] == "keepgpu.supervisor"]
    assert any("state=holding" in m and "gpu=0" in m for m in messages)
    assert all({"ts", "level", "pid", "msg"} <= set(r) for r in records)


def test_wait_ready_without_a_supervisor_gives_up_with_exit_3(base_env):
    import time

    t0 = time.monotonic()
    out = run([*CTL, "--name", "absent", "wait", "--ready", "--timeout", "1"], base_env)
    assert out.returncode == 3 and "no supervisor answering after 1s" in out.stderr
    assert time.monotonic() - t0 < 10


def test_wait_ready_reports_a_fatal_gpu_with_exit_1(start_sup):
    sup = start_sup("--gpus", "0,1", "--heartbeat", "0.2",
                    env={"KEEPGPU_FAKE_EXIT_CONFIG": "1:1"})
    out = sup.ctl("wait", "--ready", "--timeout", "20")
    assert out.returncode == 1 and "GPU(s) 1 fatal" in out.stderr


@pytest.mark.parametrize("detach", [False, True], ids=["fg", "detach"])
def test_log_file_fifo_is_refused_at_once_not_waited_on(base_env, runtime_dir, detach):
    fifo = runtime_dir / "log.fifo"
    os.mkfifo(fifo)
    cmd = [*SUPERVISE, "--gpus", "0", "--log-file", str(fifo)] + (["--detach"] if detach else [])
    out = subprocess.run(cmd, env=base_env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 78, out.stderr
    assert out.stderr.count("\n") == 1 and "FIFO" in out.stderr
    assert not (runtime_dir / "default.pid").exists()
