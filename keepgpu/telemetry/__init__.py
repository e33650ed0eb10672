"""Telemetry layer: NVML, AMD SMI, fake and null backends behind one interface. Never imports torch."""

from keepgpu.telemetry.base import (
    DeviceInfo,
    GpuProcess,
    GpuSample,
    Telemetry,
    TelemetryUnavailable,
)
from keepgpu.telemetry.null import NullTelemetry

__all__ = [
    "DeviceInfo",
    "GpuProcess",
    "GpuSample",
    "NullTelemetry",
    "Telemetry",
    "TelemetryUnavailable",
]
