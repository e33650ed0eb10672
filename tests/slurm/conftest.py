"""Print the Slurm tests' measured latencies at the end of the run."""

from __future__ import annotations

import sys
from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    harness = sys.modules.get("slurm_harness")
    timings = getattr(harness, "TIMINGS", None)
    if not timings:
        return
    terminalreporter.section("keepgpu Slurm latencies")
    for key in sorted(timings):
        terminalreporter.write_line(f"{key:32s} {timings[key]:8.3f}")
