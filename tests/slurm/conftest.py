"""The Slurm tests' shared cluster (one per session) and their measured latencies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CLUSTER = Path(__file__).resolve().parent / "cluster.sh"


@pytest.fixture(scope="session")
def cluster() -> Iterator[None]:
    """The single-node cluster plus 4 simulated nodes (partition "multi"), up for the session."""
    import slurm_harness as h  # imported here: the test modules skip before it can fail

    env = dict(os.environ, KEEPGPU_SLURM_BUILD_PYTHON=sys.executable)
    t0 = time.monotonic()
    res = subprocess.run([str(CLUSTER), "up", "--nodes", str(len(h.NODES))], capture_output=True,
                         text=True, timeout=600, env=env)
    if res.returncode != 0:
        pytest.fail(f"cluster.sh up failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    h.TIMINGS["cluster_up_s"] = time.monotonic() - t0
    try:
        yield
    finally:
        if os.environ.get("KEEPGPU_SLURM_KEEP") != "1":
            subprocess.run([str(CLUSTER), "down"], capture_output=True, timeout=120)
        h.write_timings()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    harness = sys.modules.get("slurm_harness")
    timings = getattr(harness, "TIMINGS", None)
    if not timings:
        return
    terminalreporter.section("keepgpu Slurm latencies")
    for key in sorted(timings):
        terminalreporter.write_line(f"{key:32s} {timings[key]:8.3f}")
