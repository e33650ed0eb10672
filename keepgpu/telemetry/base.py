"""The telemetry interface: what a worker (and device selection) may ask of the hardware.

Never imports torch. Unknown values are None, never a made-up 0.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


class TelemetryUnavailable(Exception):
    """The backend cannot be opened here (no driver, no library, no such device)."""


@dataclass(frozen=True)
class DeviceInfo:
    """One device as the vendor library lists it (for `--gpus` selection without torch)."""

    index: int
    uuid: str
    name: str | None = None
    mem_total_bytes: int | None = None
    #: The id the vendor runtime takes in its *_VISIBLE_DEVICES when it differs from `uuid`
    #: (AMD: ROCr's "GPU-<16 hex>"); None when there is none or it is `uuid` itself.
    runtime_id: str | None = None
    # The MIG-enabled GPU this MIG instance lives on; None for a whole GPU. A MIG instance's
    # `index` is its parent's (CUDA ordinals do not map onto MIG instances: pin by UUID).
    parent_uuid: str | None = None


@dataclass(frozen=True)
class GpuProcess:
    """A process with a context on the device. uid None when it cannot be resolved (containers)."""

    pid: int
    used_bytes: int | None = None
    util_pct: float | None = None
    uid: int | None = None


@dataclass(frozen=True)
class GpuSample:
    """One reading of a device. Percent 0-100, bytes, degrees C, watts; None = unknown."""

    uuid: str | None = None
    name: str | None = None
    util_pct: float | None = None
    own_util_pct: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    # Free bytes as the vendor counts them (NVML v2 `free` leaves out driver-reserved memory,
    # which total - used would count as free); None where the backend does not report it.
    mem_free_reported_bytes: int | None = None
    temp_c: float | None = None
    power_w: float | None = None
    pstate: str | None = None
    sm_clock_mhz: float | None = None
    processes: tuple[GpuProcess, ...] | None = None
    lost: bool = False
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mem_free_bytes(self) -> int | None:
        """Free bytes: the vendor's own count when reported, else total - used."""
        if self.mem_free_reported_bytes is not None:
            return self.mem_free_reported_bytes
        if self.mem_used_bytes is None or self.mem_total_bytes is None:
            return None
        return max(0, self.mem_total_bytes - self.mem_used_bytes)

    def status_fields(self) -> dict[str, Any]:
        """The fields that go into heartbeats and `status` (protocol names); readings are
        rounded to 2 decimals (more is noise, and 64 GPUs' worth of digits slows `status`)."""
        return {
            "uuid": self.uuid,
            "name": self.name,
            "util_pct": _round(self.util_pct),
            "own_util_pct": _round(self.own_util_pct),
            "mem_used_bytes": self.mem_used_bytes,
            "mem_total_bytes": self.mem_total_bytes,
            "temp_c": _round(self.temp_c),
            "power_w": _round(self.power_w),
            "pstate": self.pstate,
            "sm_clock_mhz": _round(self.sm_clock_mhz),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Telemetry(Protocol):
    """A per-device telemetry source opened by UUID.

    `sample(own_pids)` never raises for vendor "not supported" errors: those fields are None.
    A device that fell off the bus gives `lost=True`.
    """

    backend: str

    def sample(self, own_pids: Collection[int] = ()) -> GpuSample: ...

    def close(self) -> None: ...


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
