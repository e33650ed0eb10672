"""Telemetry layer: NVML, AMD SMI, fake and null backends behind one interface.

Never imports torch. Importing this package has no side effects (NVML/AMD SMI are initialised by
the first open; amdsmi is imported only when an AMD backend is opened).
"""

from keepgpu.telemetry.base import (
    DeviceInfo,
    GpuProcess,
    GpuSample,
    Telemetry,
    TelemetryUnavailable,
)
from keepgpu.telemetry.fake import FakeTelemetry, Scenario, fake_device_uuid, parse_scenario
from keepgpu.telemetry.null import NullTelemetry
from keepgpu.telemetry.open import list_devices, open_telemetry

__all__ = [
    "DeviceInfo",
    "FakeTelemetry",
    "GpuProcess",
    "GpuSample",
    "NullTelemetry",
    "Scenario",
    "Telemetry",
    "TelemetryUnavailable",
    "fake_device_uuid",
    "list_devices",
    "open_telemetry",
    "parse_scenario",
]
