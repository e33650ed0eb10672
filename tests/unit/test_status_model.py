"""The shared status model, the 80-column status table, explain's sentences and top's frame,
from status results written as docs/protocol.md describes them (no processes: pure rendering).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from rich.console import Console

from keepgpu.cli.explain import render_explain
from keepgpu.cli.model import GiB, duration, human_bytes, parse_status
from keepgpu.cli.table import render_status
from keepgpu.cli.top import SPARK_SPAN_S, KeeperFeed
from keepgpu.cli.top_frame import frame, sparkline
from keepgpu.client import Client

CONFIG = {"engine": "fake", "max_restarts": 5, "restart_window_s": 300.0,
          "start_timeout_s": 120.0, "join_timeout_s": 5.0, "kill_timeout_s": 5.0}
POLICY = {"mode": "duty", "target_util": 30.0, "busy_threshold": 10.0, "max_temp": 83.0,
          "on_pressure": "yield", "hold_target_bytes": 2 * GiB, "hold_want_bytes": 2 * GiB,
          "busy_clear_s": 2.0, "calm_for_s": None, "thermal_resume_c": 78.0}


def gpu(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "gpu": 0, "device_entry": "0", "uuid": "GPU-8f3c", "name": "Fake GPU", "state": "holding",
        "reason": None, "pid": 2345, "incarnation": 1, "restarts": 0, "last_exit": None,
        "heartbeat_age_s": 0.4, "held_bytes": 2 * GiB, "util_pct": 30.4, "own_util_pct": 30.0,
        "mem_used_bytes": 3 * GiB, "mem_total_bytes": 80 * GiB, "temp_c": 44.0, "power_w": 121.3,
        "pstate": "P0", "duty_pct": 31.2, "error": None, "others_util_pct": 0.0,
        "policy": dict(POLICY), "other_processes": [], "restarts_in_window": 0,
        "restart_in_s": None, "pause_left_s": None, "paused_forever": False,
    }
    base.update(kw)
    return base


def status(*gpus: dict[str, Any]) -> dict[str, Any]:
    sup = {"pid": 1234, "name": "default", "version": "0.1.0", "state": "running",
           "uptime_s": 185.0, "endpoint": "ipc:///tmp/x/default.ctl", "config": CONFIG}
    return {"supervisor": sup, "gpus": list(gpus)}


def test_human_units() -> None:
    assert human_bytes(2 * GiB) == "2.0 GiB"
    assert human_bytes(512 * 1024**2) == "512 MiB"
    assert human_bytes(None) == "-"
    assert duration(185) == "3m05s" and duration(0.4) == "0.4s" and duration(None) == "-"


def test_unknown_telemetry_stays_unknown() -> None:
    g = parse_status(status(gpu(temp_c=None, power_w=None, policy=None))).gpus[0]
    assert g.temp_c is None and g.power_w is None and g.policy is None
    row = render_status(status(gpu(temp_c=None, power_w=None))).splitlines()[2]
    assert " 0°C" not in row and " 0W" not in row and " - " in row


def test_status_fits_80_columns_in_the_worst_case() -> None:
    worst = gpu(gpu=15, state="holding", reason="pressure-held", pid=4194304, restarts=12345,
                held_bytes=800 * GiB, own_util_pct=100.0, others_util_pct=100.0,
                temp_c=105.0, power_w=1000.0,
                error="no READY within 120s " * 8)
    text = render_status(status(gpu(), worst))
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "800.0 GiB" in text and "105°C" in text and "1000W" in text
    assert str(800 * GiB) not in text, "never raw bytes"
    header = text.splitlines()[1].split()
    assert header == ["GPU", "STATE", "HELD", "UTIL-OWN", "OTHERS", "TEMP", "POWER", "PID",
                      "RESTARTS"]


def test_wide_adds_uuid_pstate_duty_heartbeat() -> None:
    text = render_status(status(gpu()), wide=True)
    for word in ("UUID", "PSTATE", "DUTY", "HB-AGE", "GPU-8f3c", "P0", "31%", "0.4s",
                 "3.0 GiB/80.0 GiB", "ipc:///tmp/x/default.ctl"):
        assert word in text, word


def explained(**kw: Any) -> str:
    return render_explain(status(gpu(**kw))).split("\n", 1)[1].replace("\n  ", " ")


def test_explain_holding_gives_the_duty_and_the_utilization() -> None:
    line = explained()
    assert line.startswith("gpu 0: holding 2.0 GiB, duty 31 % keeps utilization at 30 % "
                           "(target 30 %)"), line
    assert "others use 0 %, it backs off above 10 %" in line


def test_explain_busy_names_the_process_and_the_threshold() -> None:
    procs = [{"pid": 4242, "uid": os.getuid(), "util_pct": 63.0, "used_bytes": GiB}]
    line = explained(state="backoff", reason="busy", others_util_pct=63.0,
                     other_processes=procs)
    me = parse_status(status(gpu(other_processes=procs))).gpus[0].others[0].user
    assert (f"backing off: pid 4242 ({me}) uses 63 % > busy threshold 10 %; resumes after 2 s "
            "below it") in line


def test_explain_busy_without_per_process_data_says_how_it_judged() -> None:
    line = explained(state="backoff", reason="busy", others_util_pct=40.0,
                     policy={**POLICY, "calm_for_s": 0.5})
    assert "other processes use 40 %" in line and "quiet probe" in line
    assert "(below for 0.5 s now)" in line


def test_explain_fatal_counts_the_crashes_and_says_how_to_retry() -> None:
    line = explained(gpu=1, state="fatal", reason="restart-limit", restarts=5, pid=None,
                     last_exit={"code": 3})
    assert "fatal: 6 crashes in 300 s, last: exit 3 — `keepgpu-ctl start --gpus 1` retries" \
        in line


def test_explain_every_state_has_numbers_not_a_bare_word() -> None:
    cases = [
        dict(state="backoff", reason="thermal", temp_c=88.0),
        dict(state="backoff", reason="paused", pause_left_s=42.0),
        dict(state="backoff", reason="paused", paused_forever=True),
        dict(state="backoff", reason="pressure", held_bytes=GiB // 2),
        dict(state="holding", reason="no-telemetry", telemetry_error="nvml: not supported"),
        dict(state="restarting", restart_in_s=1.8, restarts_in_window=2,
             last_exit={"code": 3}),
        dict(state="starting"),
        dict(state="stopped", pid=None),
        dict(state="fatal", reason="config", error="device 7 does not exist"),
        dict(state="unkillable", reason="D", error="pid 9 survived SIGKILL for 5s"),
    ]
    want = ["88°C > max temp 83 °C; resumes at or below 78 °C", "resumes by itself in 42s",
            "until `keepgpu-ctl resume --gpus 0`", "holds 512 MiB of the 2.0 GiB asked for",
            "nvml: not supported", "restarting in 1.8s after exit 3; 2 of 5 restarts used",
            "start timeout 120 s", "`keepgpu-ctl start --gpus 0` holds it again",
            "configuration error: device 7 does not exist", "survived SIGKILL"]
    for case, words in zip(cases, want, strict=True):
        line = explained(**case)
        assert words in line, (case, line)


def test_explain_lines_fit_80_columns() -> None:
    text = render_explain(status(gpu(state="fatal", reason="config", error="x " * 100)))
    assert max(len(line) for line in text.splitlines()) <= 80


def test_sparkline_shows_the_last_minute_oldest_left() -> None:
    now = 1000.0
    hist = deque([(now - SPARK_SPAN_S + 1, 0.0, 100.0), (now, 100.0, None)])
    line = sparkline(hist, 1, 10, now)
    assert len(line) == 10 and line[0] == "▁" and line[-1] == "█" and line[5] == " "
    assert sparkline(hist, 2, 10, now)[-1] == " ", "unknown is blank, not a made-up 0"


def test_top_frame_fits_80_by_24_and_records_state_changes(tmp_path: Path) -> None:
    feed = KeeperFeed("default", "ipc:///nowhere", Client("ipc:///nowhere"))
    try:
        feed.view = parse_status(status(gpu(), gpu(gpu=1)))
        feed.words = {0: "holding", 1: "holding"}
        feed.events.append("12:00:00 gpu 1: holding → backing off: others busy")
        console = Console(width=80, height=24, record=True, color_system=None)
        console.print(frame([feed], None, 80, 0.0, tmp_path))
        text = console.export_text()
    finally:
        feed.client.close()
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80, text
    assert "supervisor default  pid 1234" in text and "2.0 GiB of 80.0 GiB" in text
    assert "holding → backing off: others busy" in text and "44°C" in text and "P0" in text


def test_keepgpu_ctl_loads_rich_only_for_top() -> None:
    # Other users' and minimal installs run status/stop (the security tests run it as nobody).
    code = "import sys, keepgpu.cli.ctl; print('rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_a_yielded_gpu_and_the_time_left_are_explained():
    from keepgpu.cli.explain import explain_gpu
    from keepgpu.cli.model import parse_status

    k = parse_status({
        "supervisor": {"name": "x", "pid": 1, "state": "running", "uptime_s": 5,
                       "hold_left_s": 5400.0, "config": {"engine": "fake"}},
        "gpus": [{"gpu": 0, "state": "yielded", "yielded_to": [4242, 4343]}],
    })
    assert "ends in 1h30m" in k.header()
    g = k.gpus[0]
    assert g.words == "yielded to a command"
    assert explain_gpu(g, k).startswith("yielded to pids 4242, 4343: its worker is stopped")
