"""Fake telemetry: a modelled GPU driven by named scenarios, an injected clock and the keeper's
own state, for tests and `--engine fake` on machines without a GPU.

Scenario spec: `name[:key=value,...]`, e.g. `busy:after=2,for=5,util=60` (see docs/telemetry.md).
The event of a scenario is active from `after` seconds after construction for `for` seconds.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from keepgpu.protocol.units import UnitError, parse_size
from keepgpu.telemetry.base import GpuProcess, GpuSample

MiB = 1024**2
GiB = 1024**3

#: Device memory the driver and the keeper's context use before any hold (bytes).
BASELINE_BYTES = 512 * MiB
#: PIDs of modelled other processes: above Linux PID_MAX_LIMIT (2**22), never a real process.
FAKE_PID_BASE = 4_200_000
#: Memory a `pressure` process keeps once its event is over (bytes).
PRESSURE_AFTER_BYTES = 1 * GiB

IDLE_TEMP_C = 40.0
IDLE_POWER_W = 70.0
LOAD_TEMP_C = 15.0  # added at 100 % load
LOAD_POWER_W = 180.0  # added at 100 % load
P0_CLOCK_MHZ = 1980.0
P8_CLOCK_MHZ = 345.0

_COMMON: dict[str, float] = {"after": 1.0, "for": math.inf, "gain": 1.0, "perproc": 1.0}
#: Scenario name -> its own keys with their defaults (sizes in bytes).
SCENARIOS: dict[str, dict[str, float]] = {
    "idle": {},
    "busy": {"util": 85.0, "mem": float(GiB)},
    "pressure": {"free": float(128 * MiB), "util": 0.0},
    "foreign-pressure": {"free": float(128 * MiB), "util": 0.0},
    "hot": {"temp": 90.0},
    "lost": {},
    "no-util": {"after": 0.0},
    "flaky": {"every": 3.0, "after": 0.0},
}
_SIZE_KEYS = frozenset({"free", "mem"})
_PERCENT_KEYS = frozenset({"util"})


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario: its name and every key with its value (defaults filled in)."""

    name: str
    params: Mapping[str, float] = field(default_factory=dict)

    @property
    def after_s(self) -> float:
        return self.params["after"]

    @property
    def for_s(self) -> float:
        return self.params["for"]

    def active(self, elapsed_s: float) -> bool:
        """Whether the event is on `elapsed_s` seconds after construction."""
        return self.after_s <= elapsed_s < self.after_s + self.for_s

    def over(self, elapsed_s: float) -> bool:
        """Whether the event has started and ended."""
        return elapsed_s >= self.after_s + self.for_s


def _parse_value(name: str, key: str, text: str) -> float:
    what = "a size like 128MiB" if key in _SIZE_KEYS else "a number"
    try:
        if key in _SIZE_KEYS:
            value = 0.0 if text.strip() == "0" else float(parse_size(text))
        else:
            value = float(text)
    except (UnitError, ValueError):
        value = math.nan
    if math.isnan(value):
        raise ValueError(f"fake scenario {name!r}: {key}={text!r} is not {what}")
    if value < 0:
        raise ValueError(f"fake scenario {name!r}: {key}={text!r} must not be negative")
    problem = None
    if key == "for" and value == 0:
        problem = "must be more than 0 seconds"
    elif key in _PERCENT_KEYS and value > 100:
        problem = "is a percent (0-100)"
    elif key == "gain" and value == 0:
        problem = "must be more than 0"
    elif key == "every" and (value < 1 or value != int(value)):
        problem = "must be a whole number of samples, at least 1"
    elif key == "perproc" and value not in (0.0, 1.0):
        problem = "must be 0 or 1"
    if problem:
        raise ValueError(f"fake scenario {name!r}: {key}={text!r} {problem}")
    return value


def parse_scenario(text: str) -> Scenario:
    """Parse `name[:key=value,...]` into a Scenario.

    Raises ValueError with a clear message for an unknown name, an unknown or repeated key, or
    a bad value. Times are seconds; `free`/`mem` are sizes (128MiB, 2GiB, plain bytes).
    """
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in SCENARIOS:
        known = ", ".join(sorted(SCENARIOS))
        raise ValueError(f"unknown fake telemetry scenario {name!r} (known: {known})")
    params = {**_COMMON, **SCENARIOS[name]}
    seen: set[str] = set()
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            raise ValueError(f"fake scenario {name!r}: expected key=value, got {item!r}")
        if key not in params:
            allowed = ", ".join(sorted(params))
            raise ValueError(f"fake scenario {name!r}: unknown key {key!r} (allowed: {allowed})")
        if key in seen:
            raise ValueError(f"fake scenario {name!r}: key {key!r} given twice")
        seen.add(key)
        params[key] = _parse_value(name, key, value)
    return Scenario(name=name, params=params)


def fake_device_uuid(entry: str) -> str:
    """A stable NVIDIA-style UUID for a CUDA_VISIBLE_DEVICES entry ("3" -> GPU-fa4e...000003).

    An entry that already is a UUID (GPU-..., MIG-...) is returned unchanged.
    """
    entry = entry.strip()
    if not entry:
        raise ValueError("empty device entry")
    if entry[:4].upper() in ("GPU-", "MIG-"):
        return entry
    if entry.isdigit() and len(entry) <= 12:
        tail = entry.zfill(12)
    else:
        tail = hashlib.sha256(entry.encode()).hexdigest()[:12]
    return f"GPU-fa4e0000-0000-4000-8000-{tail}"


class FakeTelemetry:
    """A modelled GPU (see the module docstring and docs/telemetry.md).

    `clock()`: seconds, monotonic (injected so tests need no sleeps). `own_duty()`: fraction
    0..1 of time the keeper's kernels run. `own_held()`: bytes the keeper holds. `own_pid`:
    the keeper's PID as listed among the device's processes (default: this process).
    """

    backend = "fake"

    def __init__(
        self,
        scenario: str | Scenario = "idle",
        *,
        uuid: str,
        name: str = "Fake GPU",
        mem_total_bytes: int = 80 * GiB,
        clock: Callable[[], float] = time.monotonic,
        own_duty: Callable[[], float] = lambda: 0.0,
        own_held: Callable[[], int] = lambda: 0,
        own_pid: int | None = None,
    ) -> None:
        self.scenario = parse_scenario(scenario) if isinstance(scenario, str) else scenario
        self.uuid = uuid
        self.name = name
        self.mem_total_bytes = mem_total_bytes
        self._clock = clock
        self._own_duty = own_duty
        self._own_held = own_held
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self._t0 = clock()
        self._count = 0

    def close(self) -> None:
        return None

    def elapsed_s(self) -> float:
        """Seconds since construction, by the injected clock."""
        return self._clock() - self._t0

    def _param(self, key: str) -> float:
        return self.scenario.params[key]

    def _others(self, elapsed: float, held: int) -> list[GpuProcess]:
        """The modelled other processes (bytes, percent, uid) at `elapsed` seconds."""
        name, active = self.scenario.name, self.scenario.active(elapsed)
        uid = os.getuid()
        if name == "busy" and active:
            return [GpuProcess(pid=FAKE_PID_BASE + 1, used_bytes=int(self._param("mem")),
                               util_pct=self._param("util"), uid=uid + 1)]
        if name in ("pressure", "foreign-pressure") and (active or self.scenario.over(elapsed)):
            if active:
                greedy = self.mem_total_bytes - BASELINE_BYTES - held - int(self._param("free"))
                used, util = max(0, greedy), self._param("util")
            else:
                used, util = PRESSURE_AFTER_BYTES, 0.0
            owner = uid if name == "pressure" else uid + 1
            return [GpuProcess(pid=FAKE_PID_BASE + 2, used_bytes=used, util_pct=util, uid=owner)]
        return []

    def sample(self, own_pids: Collection[int] = ()) -> GpuSample:
        """Model a reading now. `own_pids` as for NVML (empty = `own_pid`)."""
        self._count += 1
        elapsed = self.elapsed_s()
        name, active = self.scenario.name, self.scenario.active(elapsed)
        extra: dict[str, Any] = {"scenario": name, "event": active}
        if name == "lost" and active:
            return GpuSample(uuid=self.uuid, name=self.name, lost=True, error="gpu lost",
                             extra=extra)
        duty = min(1.0, max(0.0, float(self._own_duty())))
        held = max(0, int(self._own_held()))
        own_load = min(100.0, duty * 100.0 * self._param("gain"))
        others = self._others(elapsed, held)
        other_load = min(100.0, sum(p.util_pct or 0.0 for p in others))
        load = min(100.0, own_load + other_load)
        per_process = self._param("perproc") == 1.0 and not (name == "no-util" and active)
        device_util = not (name == "no-util" and active)
        error = None
        if name == "flaky" and active and self._count % int(self._param("every")) == 0:
            device_util, per_process = False, False
            error = "nvmlDeviceGetUtilizationRates: Unknown Error (fake flaky scenario)"
        mine = self.own_pid in (set(own_pids) or {self.own_pid})
        me = GpuProcess(pid=self.own_pid, used_bytes=held, util_pct=own_load, uid=os.getuid())
        processes = tuple(
            p if per_process else GpuProcess(p.pid, p.used_bytes, None, p.uid)
            for p in (me, *others)
        )
        used = BASELINE_BYTES + held + sum(p.used_bytes or 0 for p in others)
        busy = duty > 0 or other_load > 0
        hot = name == "hot" and active
        return GpuSample(
            uuid=self.uuid,
            name=self.name,
            util_pct=load if device_util else None,
            own_util_pct=(own_load if mine else 0.0) if per_process else None,
            mem_used_bytes=min(self.mem_total_bytes, used),
            mem_total_bytes=self.mem_total_bytes,
            temp_c=self._param("temp") if hot else IDLE_TEMP_C + LOAD_TEMP_C * load / 100.0,
            power_w=IDLE_POWER_W + LOAD_POWER_W * load / 100.0,
            pstate="P0" if busy else "P8",
            sm_clock_mhz=P0_CLOCK_MHZ if busy else P8_CLOCK_MHZ,
            processes=processes,
            error=error,
            extra=extra,
        )
