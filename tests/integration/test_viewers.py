"""`keepgpu-ctl status`, `explain` and `top` against real fake-engine keepers, as a newcomer
runs them; `top` for real in a terminal under tmux (send-keys / capture-pane).

(Named test_viewers, not test_watch: tests/unit/test_watch.py exists and the test dirs are not
packages, so two modules of one basename would clash at collection.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kgtest import CTL, Sup, wait_until

from keepgpu.client import NoSupervisor

FAST = ("--heartbeat", "0.2", "--restart-delay", "0.1")

pytestmark = pytest.mark.timeout(90)


def ctl(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_status_fits_80_columns_with_human_units(start_sup):
    sup: Sup = start_sup("--gpus", "0,1", "--vram", "2GiB", *FAST)
    sup.wait_states("holding")
    out = sup.ctl("status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, out.stdout
    assert lines[0].startswith(f"supervisor {sup.name}  pid {sup.pid}  running")
    assert len(lines) == 4 and all("2.0 GiB" in row and "°C" in row for row in lines[2:])
    assert str(2 * 1024**3) not in out.stdout, "raw bytes"
    wide = sup.ctl("status", "--wide")
    assert wide.returncode == 0 and "GPU-" in wide.stdout and "HB-AGE" in wide.stdout
    assert "UTIL-OWN" in sup.ctl("status", "--help").stdout


def _reason(sup: Sup) -> str | None:
    try:
        return sup.gpus()[0]["reason"]  # type: ignore[no-any-return]
    except NoSupervisor:
        return None  # not bound yet


def test_explain_busy_gives_pid_load_threshold_and_what_resumes(start_sup):
    sup: Sup = start_sup("--gpus", "0", *FAST,
                         env={"KEEPGPU_FAKE_TELEMETRY": "busy:after=1,util=63"})
    wait_until(lambda: _reason(sup) == "busy", 20)
    g = sup.gpus()[0]
    assert g["policy"]["busy_threshold"] == 10.0 and g["policy"]["busy_clear_s"] == 2.0
    assert g["other_processes"][0]["pid"] == 4_200_001
    out = sup.ctl("explain")
    assert out.returncode == 0, out.stderr
    text = out.stdout.replace("\n  ", " ")
    assert "gpu 0: backing off: pid 4200001 (" in text
    assert "uses 63 % > busy threshold 10 %; resumes after 2 s below it" in text


def test_explain_follows_a_set_and_a_timed_pause(start_sup):
    sup: Sup = start_sup("--gpus", "0", *FAST)
    sup.wait_states("holding")
    assert sup.ctl("set", "--busy-threshold", "25").returncode == 0
    wait_until(lambda: (sup.gpus()[0]["policy"] or {}).get("busy_threshold") == 25.0, 10)
    assert "it backs off above 25 %" in sup.ctl("explain").stdout.replace("\n  ", " ")
    assert sup.ctl("pause", "--seconds", "600").returncode == 0
    wait_until(lambda: sup.gpus()[0]["reason"] == "paused", 10)
    text = sup.ctl("explain").stdout.replace("\n  ", " ")
    assert "paused by `keepgpu-ctl pause`" in text and "resumes by itself in 9m" in text


def test_explain_fatal_counts_crashes_and_names_the_retry(start_sup):
    # GPU 1 crash-loops; GPU 0 keeps the supervisor up (all fatal would end it).
    sup: Sup = start_sup("--gpus", "0,1", *FAST, "--max-restarts", "2",
                         env={"KEEPGPU_FAKE_CRASH_AFTER": "1:0.1"})
    sup.wait_states({0: "holding", 1: "fatal"}, timeout=30)
    text = sup.ctl("explain", "--gpus", "1").stdout.replace("\n  ", " ")
    assert "gpu 1: fatal: 3 crashes in 300 s, last: exit 3 — `keepgpu-ctl start --gpus 1` " \
        "retries" in text
    assert "gpu 0" not in text


@pytest.mark.parametrize("cmd", [["explain", "--gpus", "7"], ["top", "--once", "--gpus", "7"]])
def test_unknown_gpu_is_one_line_exit_1(start_sup, cmd):
    sup: Sup = start_sup("--gpus", "0", *FAST)
    sup.wait_states("holding")
    out = sup.ctl(*cmd)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1 and "7" in out.stderr
    assert "Traceback" not in out.stderr


def test_top_once_without_keeper_says_so_and_exits_3(base_env):
    out = ctl(base_env, "top", "--once")
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert "no keeper running" in out.stdout


def test_top_once_shows_every_keeper_of_the_runtime_dir(start_sup, base_env):
    one: Sup = start_sup("--gpus", "0", *FAST)
    two: Sup = start_sup("--gpus", "0,1", *FAST)
    one.wait_states("holding")
    two.wait_states("holding")
    out = ctl(base_env, "top", "--once")
    assert out.returncode == 0, out.stderr
    assert f"supervisor {one.name}  pid {one.pid}" in out.stdout
    assert f"supervisor {two.name}  pid {two.pid}" in out.stdout
    assert out.stdout.count(" holding ") == 3 and "\x1b[" not in out.stdout, "plain, no ANSI"
    only = ctl(base_env, "--name", one.name, "top", "--once")
    assert one.name in only.stdout and two.name not in only.stdout


def _pane(sock: str) -> str:
    return subprocess.run(["tmux", "-L", sock, "capture-pane", "-p", "-t", "top"],
                          capture_output=True, text=True, timeout=10).stdout


def _pane_with(sock: str, words: str) -> str | None:
    pane = _pane(sock)
    return pane if words in pane else None


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_top_live_in_a_terminal_refreshes_records_events_and_quits_on_q(
        start_sup, base_env, runtime_dir: Path):
    sup: Sup = start_sup("--gpus", "0", *FAST,
                         env={"KEEPGPU_FAKE_TELEMETRY": "busy:after=6,util=70"})
    sup.wait_states("holding")
    sock, rc_file = f"kgtest{uuid.uuid4().hex[:8]}", runtime_dir / "top.rc"
    cmd = f"{sys.executable} -m keepgpu.cli.ctl top; echo $? > {rc_file}; sleep 60"
    env = {**base_env, "TERM": "xterm-256color"}
    subprocess.run(["tmux", "-L", sock, "-f", "/dev/null", "new-session", "-d", "-s", "top",
                    "-x", "80", "-y", "24", cmd], env=env, check=True, timeout=10)
    try:
        first = wait_until(lambda: _pane_with(sock, "holding"), 20)
        assert f"supervisor {sup.name}" in first and "q quits" in first
        clock = first.splitlines()[0]
        # Refreshes in place: the title's clock moves, and the busy event is seen and recorded.
        busy = wait_until(lambda: _pane_with(sock, "→ backing off"), 30)
        assert busy.splitlines()[0] != clock
        assert "gpu 0: holding → backing off: others busy" in busy
        assert len(busy.rstrip("\n").splitlines()) <= 24
        subprocess.run(["tmux", "-L", sock, "send-keys", "-t", "top", "q"], check=True,
                       timeout=10)
        rc = wait_until(lambda: rc_file.read_text().strip() if rc_file.exists() else None, 10)
        assert rc == "0"
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True, timeout=10)
