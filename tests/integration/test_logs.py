"""Logs of a real supervisor and its workers (issue 11, item 6): with --log-format json every
line of stderr is one JSON object with structured fields; text lines say each thing once, in
words and human units."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from kgtest import Sup, wait_until

GiB = 1024**3
COMMON = ("ts", "level", "logger", "pid", "event", "msg")
# gpu 0 crashes once (exit code 3) and is restarted; gpu 1 ignores STOP (SIGKILLed at the
# end); gpu 2 is a configuration error (the worker's own words, then fatal); all back off
# for a while as another process makes the device busy.
FAULTS = {
    "KEEPGPU_FAKE_CRASH_AFTER": "0/1:1",
    "KEEPGPU_FAKE_IGNORE_STOP": "1:1",
    "KEEPGPU_FAKE_EXIT_CONFIG": "2:1",
    "KEEPGPU_FAKE_TELEMETRY": "busy:after=1,for=3",
}
CONFIG_ERROR = "fake device 2 does not exist"


def _drive(start_sup: Callable[..., Sup], *args: str) -> str:
    """start, crash, restart, backoff, pause, resume, stop (with a SIGKILL): the whole log."""
    sup = start_sup("--gpus", "0,1,2", "--heartbeat", "0.2", "--restart-delay", "0.2",
                    "--join-timeout", "1", "--kill-timeout", "3", *args, env=FAULTS)
    sup.wait_states({1: "holding", 2: "fatal"})
    wait_until(lambda: (g := sup.gpus()[0])["incarnation"] == 2 and g["state"] != "starting", 15)
    wait_until(lambda: any(g["reason"] == "busy" for g in sup.gpus()), 15)
    sup.call("pause")
    wait_until(lambda: all(g["reason"] == "paused" for g in sup.gpus()[:2]), 10)
    sup.call("resume")
    wait_until(lambda: all(g["reason"] != "paused" for g in sup.gpus()[:2]), 10)
    sup.call("stop", timeout=20)
    assert sup.proc.wait(15) == 1, sup.log()  # gpu 1 was killed, not released
    time.sleep(0.2)  # the last worker lines are written before the supervisor exits; be sure
    return sup.log()


def _records(log: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(rec, dict), line
        assert all(key in rec for key in COMMON), line
        out.append(rec)
    return out


def test_every_line_of_a_json_log_is_a_structured_record(start_sup: Callable[..., Sup]
                                                           ) -> None:
    records = _records(_drive(start_sup, "--log-format", "json", "-v"))
    sup_recs = [r for r in records if r["logger"] == "keepgpu.supervisor"]
    worker_recs = [r for r in records if r["logger"].startswith("keepgpu.worker")]
    assert sup_recs and worker_recs
    # Each worker line says which GPU and incarnation it comes from.
    assert all(isinstance(r["gpu"], int) and isinstance(r["incarnation"], int)
               for r in worker_recs)
    states = [r for r in sup_recs if r["event"] == "state"]
    assert all({"gpu", "worker_pid", "incarnation", "state", "reason"} <= set(r) for r in states)
    assert any(r["gpu"] == 0 and r["state"] == "holding" and r["incarnation"] == 2
               and isinstance(r["worker_pid"], int) for r in states)
    fatal = [r for r in states if r["state"] == "fatal"]
    assert [(r["gpu"], r["reason"]) for r in fatal] == [(2, "config")]
    assert CONFIG_ERROR in fatal[0]["error"]
    exits = {(r["gpu"], r["exit_code"], r["exit_signal"]) for r in sup_recs
             if r["event"] == "exit"}
    assert {(0, 3, None), (2, 78, None), (1, None, "SIGKILL")} <= exits
    assert any(r["event"] == "restart" and r["gpu"] == 0 for r in sup_recs)
    # The worker's state changes carry the readings as fields, not text.
    busy = [r for r in worker_recs if r["event"] == "state" and r["reason"] == "busy"]
    assert busy, "a backoff record from a worker"
    for key in ("util_pct", "own_util_pct", "others_util_pct", "temp_c", "power_w",
                "mem_used_bytes", "mem_total_bytes", "held_bytes", "duty_pct", "state"):
        assert key in busy[0], key
    assert busy[0]["held_bytes"] == GiB and busy[0]["util_pct"] is not None
    assert any(r["event"] == "state" and r["reason"] == "paused" for r in worker_recs)
    assert any(r["event"] == "ready" and r["held_bytes"] == GiB for r in worker_recs)
    assert any(r["event"] == "config-error" and r["gpu"] == 2 for r in worker_recs)


def test_text_log_says_exits_in_words_errors_once_and_sizes_in_units(
    start_sup: Callable[..., Sup]
) -> None:
    log = _drive(start_sup)
    assert "gpu=0 pid=" in log and "exited (exit code 3)" in log
    assert "exited (killed by SIGKILL)" in log
    assert "exited (exit code 78)" in log
    assert "{'code'" not in log and "{'signal'" not in log
    assert log.count(CONFIG_ERROR) == 1, log
    assert "holding 1.0GiB on" in log and "released 1.0GiB" in log
    assert str(GiB) not in log, "sizes in GiB/MiB, not bytes"
    assert "pid=None" not in log
    assert "restart-limit" not in log
