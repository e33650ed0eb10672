"""Test faults for the fake engine, from `KEEPGPU_FAKE_*` environment variables.

Each value is a comma-separated list of `[ENTRY[/INCARNATION]:]VALUE`: without ENTRY it applies
to every device, without /INCARNATION to every incarnation. ENTRY is the device entry the
worker was pinned to (its CUDA_VISIBLE_DEVICES value).

  KEEPGPU_FAKE_CRASH_AFTER=S     exit with code 3 after S seconds holding
  KEEPGPU_FAKE_HANG_AFTER=S      after S seconds holding, stay alive but stop the keep loop
                                 (no heartbeats; STOP and SIGTERM go unanswered)
  KEEPGPU_FAKE_IGNORE_STOP=1     ignore STOP messages and SIGTERM (only SIGKILL ends it)
  KEEPGPU_FAKE_START_DELAY=S     take S seconds before READY
  KEEPGPU_FAKE_EXIT_CONFIG=1     fail at start with exit code 78 (configuration error)
  KEEPGPU_FAKE_RELEASE_DELAY=S   take S seconds to release memory after STOP

Read by keepgpu/worker/__main__.py before anything else (`VALUE` or `ENTRY:VALUE,...`):
  KEEPGPU_FAKE_STOP_AT_SPAWN=1   SIGSTOP itself at its first line (PDEATHSIG tests)
  KEEPGPU_FAKE_EXIT_AT_SPAWN=N   exit with code N at its first line (cheap restarts)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

_VARS = {
    "crash_after": "KEEPGPU_FAKE_CRASH_AFTER",
    "hang_after": "KEEPGPU_FAKE_HANG_AFTER",
    "ignore_stop": "KEEPGPU_FAKE_IGNORE_STOP",
    "start_delay": "KEEPGPU_FAKE_START_DELAY",
    "exit_config": "KEEPGPU_FAKE_EXIT_CONFIG",
    "release_delay": "KEEPGPU_FAKE_RELEASE_DELAY",
}


@dataclass(frozen=True)
class Faults:
    crash_after: float | None = None
    hang_after: float | None = None
    ignore_stop: bool = False
    start_delay: float | None = None
    exit_config: bool = False
    release_delay: float | None = None


def _lookup(raw: str, entry: str, incarnation: int) -> str | None:
    """The value for this worker in a `[ENTRY[/INC]:]VALUE,...` list; the most specific wins."""
    best: tuple[int, str] | None = None
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        target, sep, value = item.rpartition(":")
        if not sep:
            rank, val = 0, value
        else:
            dev, slash, inc = target.partition("/")
            if dev != entry or (slash and inc != str(incarnation)):
                continue
            rank, val = (2 if slash else 1), value
        if best is None or rank > best[0]:
            best = (rank, val)
    return best[1] if best else None


def load(entry: str, incarnation: int, env: Mapping[str, str] | None = None) -> Faults:
    env = os.environ if env is None else env
    values: dict[str, float | bool | None] = {}
    for field, var in _VARS.items():
        raw = env.get(var)
        value = _lookup(raw, entry, incarnation) if raw else None
        if field in ("ignore_stop", "exit_config"):
            values[field] = value not in (None, "", "0")
        else:
            try:
                values[field] = float(value) if value else None
            except ValueError:
                raise ValueError(f"{var}: not a number of seconds: {value!r}") from None
    return Faults(**values)  # type: ignore[arg-type]
