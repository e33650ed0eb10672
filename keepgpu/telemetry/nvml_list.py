"""Listing NVIDIA devices through NVML for the supervisor's `--gpus` selection (no torch).

MIG instances are devices of their own: a GPU with MIG enabled cannot be used whole by CUDA, so
it is not listed; each of its instances is, by its `MIG-...` UUID (which CUDA_VISIBLE_DEVICES
and nvmlDeviceGetHandleByUUID both accept). Calls go through nvml.py's funnel and binding.
"""

from __future__ import annotations

import logging
from typing import Any

import pynvml

from keepgpu.telemetry import nvml
from keepgpu.telemetry.base import DeviceInfo, TelemetryUnavailable

log = logging.getLogger(__name__)


def list_devices() -> list[DeviceInfo]:
    """NVIDIA devices in NVML order (PCI bus order, not CUDA's default FASTEST_FIRST order).

    A GPU with MIG enabled is not listed itself (CUDA cannot use it whole): its MIG instances
    are, each with its own `MIG-...` UUID, its own memory and `parent_uuid` set. mem_total_bytes
    in bytes. Devices NVML cannot open are skipped with a warning. Raises TelemetryUnavailable
    when NVML cannot be initialised.
    """
    nvml._nvml_init()
    try:
        try:
            count = int(nvml._nvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            raise TelemetryUnavailable(f"NVML cannot count devices: {exc}") from exc
        funnel = nvml._Funnel()
        devices: list[DeviceInfo] = []
        for index in range(count):
            try:
                handle = nvml._nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml._text(nvml._nvml.nvmlDeviceGetUUID(handle))
                if uuid is None:
                    continue
                if _mig_enabled(funnel, handle):
                    devices.extend(_mig_instances(funnel, index, handle, uuid))
                    continue
                devices.append(_describe(funnel, index, handle, uuid, None))
            except pynvml.NVMLError as exc:
                log.warning("NVML device %d skipped: %s", index, exc)
            except nvml._GpuLost:
                log.warning("NVML device %d skipped: gpu lost", index)
        return devices
    finally:
        nvml._nvml_shutdown()


def _mig_enabled(funnel: nvml._Funnel, handle: Any) -> bool:
    """MIG mode is on now (the current mode; a pending change needs a GPU reset first).
    NotSupported (no MIG on this GPU) and a binding without MIG calls give False."""
    mode = funnel.call("nvmlDeviceGetMigMode", handle)
    return mode is not None and int(mode[0]) == pynvml.NVML_DEVICE_MIG_ENABLE


def _mig_instances(
    funnel: nvml._Funnel, index: int, parent: Any, parent_uuid: str
) -> list[DeviceInfo]:
    """The MIG devices of a MIG-enabled GPU. Slots run 0..nvmlDeviceGetMaxMigDeviceCount-1 and
    may be empty (NotFound), e.g. after an instance in the middle was destroyed."""
    slots = funnel.call("nvmlDeviceGetMaxMigDeviceCount", parent)
    found = []
    for slot in range(int(slots or 0)):
        mig = funnel.call("nvmlDeviceGetMigDeviceHandleByIndex", parent, slot)
        if mig is None:
            continue
        uuid = nvml._text(funnel.call("nvmlDeviceGetUUID", mig))
        if uuid is None:
            log.warning("NVML MIG device %d/%d skipped: no UUID", index, slot)
            continue
        found.append(_describe(funnel, index, mig, uuid, parent_uuid))
    if not found:
        log.warning("NVML device %d (%s) has MIG enabled but no MIG instance: nothing to hold",
                    index, parent_uuid)
    return found


def _describe(
    funnel: nvml._Funnel, index: int, handle: Any, uuid: str, parent_uuid: str | None
) -> DeviceInfo:
    """One listed device; on a MIG handle the memory is the instance's own."""
    name = nvml._text(funnel.call("nvmlDeviceGetName", handle))
    mem = funnel.call("nvmlDeviceGetMemoryInfo", handle)
    total = None if mem is None else int(mem.total)
    return DeviceInfo(index=index, uuid=uuid, name=name, mem_total_bytes=total,
                      parent_uuid=parent_uuid)
