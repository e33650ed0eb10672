"""The torch engine on the CPU (`--engine cpu`): holds real memory and pulses."""

from __future__ import annotations

import importlib.util

import psutil
import pytest
from kgtest import Sup, wait_until

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="torch is not installed")


def test_cpu_engine_holds_memory_and_pulses(start_sup):
    sup: Sup = start_sup("--engine", "cpu", "--gpus", "all", "--vram", "64MiB",
                         "--heartbeat", "0.5", "--start-timeout", "60", "--target-util", "20")
    g = sup.wait_states("holding", timeout=60)[0]
    assert g["held_bytes"] == 64 * 1024**2
    assert g["name"] == "cpu" and g["device_entry"] == "cpu"
    worker = psutil.Process(g["pid"])
    assert worker.memory_info().rss >= 64 * 1024**2
    busy = wait_until(lambda: (x := sup.gpus()[0])["duty_pct"] and x["duty_pct"] > 5 and x, 10)
    assert busy["duty_pct"] < 60
    cpu = worker.cpu_percent(interval=1.0)
    assert cpu > 5, "pulses burn CPU time on the cpu backend"
    result = sup.call("stop", timeout=20)
    assert result["gpus"][0]["outcome"] == "released"
    assert sup.proc.wait(10) == 0
