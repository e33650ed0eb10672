"""Open a telemetry backend by name (the worker's `--telemetry`/engine choice) and list devices.

The fake backend is not opened here: the fake engine builds `FakeTelemetry` itself because it
needs hooks into the keeper's own state.
"""

from __future__ import annotations

from keepgpu.telemetry.base import DeviceInfo, Telemetry, TelemetryUnavailable
from keepgpu.telemetry.null import NullTelemetry

BACKENDS = ("nvml", "amdsmi", "null")
VENDORS = ("nvidia", "amd")


def open_telemetry(backend: str, uuid: str | None) -> Telemetry:
    """Open `backend` ("nvml", "amdsmi" or "null") for the device with `uuid`.

    Raises TelemetryUnavailable when the backend cannot be used here or `uuid` is missing or
    unknown; ValueError for an unknown backend name.
    """
    if backend == "null":
        return NullTelemetry(uuid=uuid)
    if backend not in BACKENDS:
        raise ValueError(f"unknown telemetry backend {backend!r} (known: {', '.join(BACKENDS)})")
    if not uuid:
        raise TelemetryUnavailable(f"{backend} telemetry needs the device UUID, none was given")
    if backend == "nvml":
        from keepgpu.telemetry.nvml import NvmlTelemetry

        return NvmlTelemetry(uuid)
    from keepgpu.telemetry.amd import AmdTelemetry

    return AmdTelemetry(uuid)


def list_devices(vendor: str) -> list[DeviceInfo]:
    """Devices of `vendor` ("nvidia" or "amd") as its management library lists them.

    Raises TelemetryUnavailable when that library is missing; ValueError for an unknown vendor.
    """
    if vendor == "nvidia":
        from keepgpu.telemetry import nvml_list

        return nvml_list.list_devices()
    if vendor == "amd":
        from keepgpu.telemetry import amd

        return amd.list_devices()
    raise ValueError(f"unknown GPU vendor {vendor!r} (known: {', '.join(VENDORS)})")
