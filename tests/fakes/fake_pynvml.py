"""A fake `pynvml` binding written from nvidia-ml-py 13.615.71's pynvml.py and NVML's docs.

It is installed as `keepgpu.telemetry.nvml._nvml`, so keepgpu's real adapter code runs against
it. What it reproduces, and where the real binding shows it:

- Errors are the real `pynvml.NVMLError_*` subclasses (`NVMLError(code)` picks the subclass).
  `nvmlDeviceGetComputeRunningProcesses` is wrapped in `throwOnVersionMismatch`: a driver
  without `_v3` raises `pynvml.NVMLLibraryMismatchError`, which is NOT an NVMLError.
- Structs are the real ctypes types: `c_nvmlMemory_t` (total/free/used, where v1 `used` counts
  the driver-reserved memory) and `c_nvmlMemory_v2_t` (version/total/reserved/free/used, `used`
  without it); `c_nvmlUtilization_t`; `c_nvmlProcessUtilizationSample_t`; processes as
  `nvmlStructToFriendlyObject(c_nvmlProcessInfo_v3_t)`, `usedGpuMemory` None when the driver
  says NVML_VALUE_NOT_AVAILABLE.
- Units: bytes, mW (`nvmlDeviceGetPowerUsage`), MHz (`nvmlDeviceGetClockInfo`), °C, per-process
  sample timestamps in CPU microseconds, each pid stamped on its own schedule.
- `nvmlDeviceGetProcessUtilization(h, ts)` returns the samples newer than `ts`; with none, the
  sizing call does not say INSUFFICIENT_SIZE and pynvml raises `NVMLError(ret)`: NotFound, or
  NVMLError(NVML_SUCCESS) on drivers that answer SUCCESS with a count of 0.
- `nvmlDeviceIsMigDeviceHandle` returns a `c_uint` (pynvml forgets `.value`).
- MIG: `nvmlDeviceGetCount`/`ByIndex` see parent GPUs only; `nvmlDeviceGetMigMode` ->
  [current, pending] (NotSupported on GPUs without MIG); `nvmlDeviceGetMaxMigDeviceCount`;
  `nvmlDeviceGetMigDeviceHandleByIndex` raises NotFound for an empty slot; a MIG handle has its
  own UUID (`MIG-...`), memory and processes, and NotSupported for utilization (device and
  per-process) and for board readings (temperature, power, clocks, P-state), which live on the
  parent. A MIG-enabled parent has no utilization either.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

import pynvml

GiB = 1024**3

NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND

#: Functions a MIG device handle answers NotSupported (they are the parent board's).
_BOARD_ONLY = frozenset({
    "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetProcessUtilization",
    "nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature", "nvmlDeviceGetTemperatureThreshold",
    "nvmlDeviceGetPowerUsage", "nvmlDeviceGetClockInfo", "nvmlDeviceGetMaxClockInfo",
    "nvmlDeviceGetPerformanceState", "nvmlDeviceGetMigMode",
})


def err(code: int) -> pynvml.NVMLError:
    """The exception pynvml raises for `code` (its real subclass)."""
    return pynvml.NVMLError(code)


@dataclass(eq=False)
class FakeGpu:
    """One device (a GPU, or a MIG instance when `parent` is set). Memory in bytes:
    free = total - reserved - used, as in c_nvmlMemory_v2_t. `fail[fn]` = an error code raised by
    that function, or a list of codes/None consumed one per call."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    util: int = 30
    mem_total: int = 80 * GiB
    mem_reserved: int = 0
    mem_used: int = 10 * GiB
    temp: int = 45
    power_mw: int = 123_456
    pstate: int = 0
    sm_clock_mhz: int = 1980
    sm_clock_max_mhz: int = 1980
    procs: list[tuple[int, int | None]] = field(default_factory=list)  # pid, used bytes
    samples: list[tuple[int, int, int]] = field(default_factory=list)  # pid, ts_us, smUtil
    empty_samples_ret: int = NOT_FOUND
    mig_mode: int | None = None  # None: not MIG-capable; NVML_DEVICE_MIG_DISABLE/ENABLE
    mig_slots: list[FakeGpu | None] = field(default_factory=list)
    parent: FakeGpu | None = None
    lost: bool = False
    fail: dict[str, Any] = field(default_factory=dict)

    def add_mig(self, uuid: str, mem_total: int, mem_used: int, **kw: Any) -> FakeGpu:
        """Put a MIG instance in the next slot of this (MIG-enabled) GPU."""
        self.mig_mode = pynvml.NVML_DEVICE_MIG_ENABLE
        mig = FakeGpu(uuid, name=f"{self.name} MIG", mem_total=mem_total, mem_used=mem_used,
                      parent=self, **kw)
        self.mig_slots.append(mig)
        return mig


class FakeNvml:
    """The functions of pynvml that keepgpu calls, over FakeGpu devices."""

    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(
        self, *gpus: FakeGpu, init_error: int | None = None, absent: frozenset[str] = frozenset(),
        driver_lacks: frozenset[str] = frozenset(),
    ) -> None:
        self.absent = absent  # not in this (older) nvidia-ml-py: AttributeError
        self.driver_lacks = driver_lacks  # in the binding, not in libnvidia-ml: FunctionNotFound
        self.gpus = list(gpus)
        self.init_error = init_error
        self.inits = 0
        self.shutdowns = 0
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattribute__(self, name: str) -> Any:
        if name in object.__getattribute__(self, "absent"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    def count(self, fn: str) -> int:
        return sum(1 for name, _ in self.calls if name == fn)

    def _dev(self, fn: str, gpu: FakeGpu, *args: Any) -> FakeGpu:
        self.calls.append((fn, args))
        if fn in self.driver_lacks:
            raise err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if gpu.lost or (gpu.parent is not None and gpu.parent.lost):
            raise err(pynvml.NVML_ERROR_GPU_IS_LOST)
        code = gpu.fail.get(fn)
        if isinstance(code, list):
            code = code.pop(0) if code else None
        if code is not None:
            raise err(code)
        if gpu.parent is not None and fn in _BOARD_ONLY:
            raise err(NOT_SUPPORTED)
        return gpu

    # --- library and handles --------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise err(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)  # physical GPUs only, MIG instances are not counted

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if not 0 <= index < len(self.gpus):
            raise err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._dev("nvmlDeviceGetHandleByIndex", self.gpus[index])

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:
        for gpu in self.gpus:
            for dev in [gpu, *gpu.mig_slots]:
                if dev is not None and dev.uuid == uuid:
                    return dev
        raise err(NOT_FOUND)

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return self._dev("nvmlDeviceGetUUID", h).uuid

    def nvmlDeviceGetName(self, h: FakeGpu) -> str:
        return self._dev("nvmlDeviceGetName", h).name

    # --- MIG --------------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, h: FakeGpu) -> list[int]:
        gpu = self._dev("nvmlDeviceGetMigMode", h)
        if gpu.mig_mode is None:
            raise err(NOT_SUPPORTED)
        return [gpu.mig_mode, gpu.mig_mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeGpu) -> int:
        gpu = self._dev("nvmlDeviceGetMaxMigDeviceCount", h)
        if gpu.mig_mode is None:
            raise err(NOT_SUPPORTED)
        return 7 if gpu.mig_mode == pynvml.NVML_DEVICE_MIG_ENABLE else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeGpu, index: int) -> FakeGpu:
        gpu = self._dev("nvmlDeviceGetMigDeviceHandleByIndex", h, index)
        if gpu.mig_mode != pynvml.NVML_DEVICE_MIG_ENABLE:
            raise err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        slot = gpu.mig_slots[index] if index < len(gpu.mig_slots) else None
        if slot is None:
            raise err(NOT_FOUND)
        return slot

    def nvmlDeviceIsMigDeviceHandle(self, h: FakeGpu) -> ctypes.c_uint:
        return ctypes.c_uint(int(self._dev("nvmlDeviceIsMigDeviceHandle", h).parent is not None))

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h: FakeGpu) -> FakeGpu:
        gpu = self._dev("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", h)
        if gpu.parent is None:
            raise err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.parent

    # --- readings ---------------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> Any:
        gpu = self._dev("nvmlDeviceGetUtilizationRates", h)
        if gpu.mig_mode == pynvml.NVML_DEVICE_MIG_ENABLE:
            raise err(NOT_SUPPORTED)
        util = pynvml.c_nvmlUtilization_t()
        util.gpu, util.memory = gpu.util, 3
        return util

    def nvmlDeviceGetProcessUtilization(self, h: FakeGpu, timeStamp: int) -> list[Any]:
        gpu = self._dev("nvmlDeviceGetProcessUtilization", h, timeStamp)
        newer = [s for s in gpu.samples if s[1] > timeStamp]
        if not newer:
            raise err(gpu.empty_samples_ret)
        out = (pynvml.c_nvmlProcessUtilizationSample_t * len(newer))()
        for slot, (pid, ts, sm) in zip(out, newer, strict=True):
            slot.pid, slot.timeStamp, slot.smUtil, slot.memUtil = pid, ts, sm, 0
        return out[0:len(newer)]

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu, version: int | None = None) -> Any:
        free = h.mem_total - h.mem_reserved - h.mem_used
        if not version:
            self._dev("nvmlDeviceGetMemoryInfo", h)
            v1 = pynvml.c_nvmlMemory_t()
            # v1 reports the reserved memory as used.
            v1.total, v1.free, v1.used = h.mem_total, free, h.mem_used + h.mem_reserved
            return v1
        self._dev("nvmlDeviceGetMemoryInfo_v2", h)
        if version != pynvml.nvmlMemory_v2:
            raise err(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        v2 = pynvml.c_nvmlMemory_v2_t()
        v2.version, v2.total, v2.reserved = version, h.mem_total, h.mem_reserved
        v2.free, v2.used = free, h.mem_used
        return v2

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list[Any]:
        try:
            gpu = self._dev("nvmlDeviceGetComputeRunningProcesses", h)
        except pynvml.NVMLError_FunctionNotFound:
            raise pynvml.NVMLLibraryMismatchError("Unversioned function called ...") from None
        procs = gpu.procs if gpu.mig_mode != pynvml.NVML_DEVICE_MIG_ENABLE else [
            p for mig in gpu.mig_slots if mig is not None for p in mig.procs]
        out = []
        for pid, used in procs:
            info = pynvml.c_nvmlProcessInfo_v3_t()
            info.pid = pid
            info.usedGpuMemory = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value if used is None \
                else used
            obj = pynvml.nvmlStructToFriendlyObject(info)
            if obj.usedGpuMemory == pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value:
                obj.usedGpuMemory = None
            out.append(obj)
        return out

    def nvmlDeviceGetTemperatureV(self, h: FakeGpu, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._dev("nvmlDeviceGetTemperatureV", h).temp

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._dev("nvmlDeviceGetTemperature", h).temp

    def nvmlDeviceGetTemperatureThreshold(self, h: FakeGpu, kind: int) -> int:
        assert kind == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        self._dev("nvmlDeviceGetTemperatureThreshold", h)
        return 87

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        return self._dev("nvmlDeviceGetPowerUsage", h).power_mw

    def nvmlDeviceGetPerformanceState(self, h: FakeGpu) -> int:
        return self._dev("nvmlDeviceGetPerformanceState", h).pstate

    def nvmlDeviceGetClockInfo(self, h: FakeGpu, kind: int) -> int:
        gpu = self._dev("nvmlDeviceGetClockInfo", h, kind)
        if kind != pynvml.NVML_CLOCK_SM:
            raise err(NOT_SUPPORTED)  # the fake models the SM clock only
        return gpu.sm_clock_mhz

    def nvmlDeviceGetMaxClockInfo(self, h: FakeGpu, kind: int) -> int:
        return self._dev("nvmlDeviceGetMaxClockInfo", h, kind).sm_clock_max_mhz


def install(monkeypatch: Any, *gpus: FakeGpu, host_pids: bool = True, **kw: Any) -> FakeNvml:
    """Make keepgpu.telemetry.nvml use a FakeNvml over `gpus` (fresh init count). `host_pids`:
    whether this process counts as living in the initial PID namespace (False = a container)."""
    from keepgpu.telemetry import nvml

    fake = FakeNvml(*gpus, **kw)
    monkeypatch.setattr(nvml, "_nvml", fake)
    monkeypatch.setattr(nvml, "_init_count", 0)
    monkeypatch.setattr(nvml, "in_initial_pid_namespace", lambda: host_pids)
    return fake
