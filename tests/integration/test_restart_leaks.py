"""The supervisor's file descriptors and memory stay flat over 1000 worker restarts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from kgtest import Sup, wait_until

GPUS = 9  # GPU 0 holds for real; 1..8 exit at their first line and go fatal at once
# 125 x 8 = 1000 restarts. Each costs one interpreter start-up (~0.1 CPU-s on a slow 2-core CI
# machine); KEEPGPU_TEST_RESTART_CYCLES makes a quicker local run.
CYCLES = int(os.environ.get("KEEPGPU_TEST_RESTART_CYCLES", "125"))
WARMUP = 10


def fds_and_rss(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return fds, int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(600)
@pytest.mark.xdist_group("long-faults")  # never beside the soak: both load the two cores
def test_fds_and_rss_flat_over_1000_restarts(start_sup):
    exits = ",".join(f"{g}:3" for g in range(1, GPUS))
    sup: Sup = start_sup("--gpus", "all", "--heartbeat", "0.5", "--hang-timeout", "5",
                         "--max-restarts", "0", "-q",
                         env={"KEEPGPU_FAKE_GPUS": str(GPUS),
                              "KEEPGPU_FAKE_EXIT_AT_SPAWN": exits})
    crashing = list(range(1, GPUS))
    want = {0: "holding", **{g: "fatal" for g in crashing}}
    sup.wait_states(want, timeout=30)

    def cycle() -> None:
        started = sup.call("start", {"gpus": crashing})["gpus"]
        assert all(g["result"] == "started" for g in started), started
        wait_until(lambda: all(g["state"] == "fatal" for g in sup.gpus()[1:]), 30, 0.05)

    for _ in range(WARMUP):  # warm-up: allocator pools, ZeroMQ buffers, import caches
        cycle()
    fds0, rss0 = fds_and_rss(sup.pid)
    t0 = time.monotonic()
    for _ in range(CYCLES):
        cycle()
    took = time.monotonic() - t0
    fds1, rss1 = fds_and_rss(sup.pid)
    g = sup.gpus()
    assert g[1]["incarnation"] == 1 + WARMUP + CYCLES
    assert g[0]["state"] == "holding" and g[0]["incarnation"] == 1
    line = (f"{CYCLES * (GPUS - 1)} restarts in {took:.0f}s: fds {fds0} -> {fds1}, "
            f"RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB")
    print(line)
    assert fds1 - fds0 <= 2, line
    assert rss1 - rss0 < 4 * 2**20, line
