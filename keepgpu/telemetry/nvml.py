"""NVML telemetry (nvidia-ml-py): one NVIDIA device opened by UUID.

Every vendor call goes through one funnel, `_Funnel.call`, which turns "not supported here" into
None, logs a function the driver lacks once, turns NVML_ERROR_GPU_IS_LOST into a lost sample and
any other NVML error into None plus an `error` string on the sample. Nothing happens at import
time: `import pynvml` works without a driver; NVML is initialised by the first open.

Tests replace `_nvml` (the binding every call is looked up on) with a stub raising real
`pynvml.NVMLError_*` exceptions.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection
from typing import Any

import psutil
import pynvml

from keepgpu.telemetry.base import DeviceInfo, GpuProcess, GpuSample, TelemetryUnavailable

log = logging.getLogger(__name__)

#: The NVML binding every call is looked up on (tests swap in a stub).
_nvml: Any = pynvml

# Per-process samples older than this are stale: the process is not running kernels now.
_PROCESS_WINDOW_US = 1_000_000

_init_lock = threading.Lock()
_init_count = 0


class _GpuLost(Exception):
    """Internal marker: NVML said NVML_ERROR_GPU_IS_LOST (the device fell off the bus)."""


def _now_us() -> int:
    """Wall-clock microseconds since the epoch: the time base of NVML per-process samples."""
    return time.time_ns() // 1000


def _nvml_init() -> None:
    """Initialise NVML once for all opens in this process (reference-counted).

    Raises TelemetryUnavailable when the library or driver is missing.
    """
    global _init_count
    with _init_lock:
        if _init_count == 0:
            try:
                _nvml.nvmlInit()
            except pynvml.NVMLError as exc:
                raise TelemetryUnavailable(
                    f"NVML unavailable: {exc} (no NVIDIA driver or libnvidia-ml.so.1 here?)"
                ) from exc
        _init_count += 1


def _nvml_shutdown() -> None:
    """Drop one reference taken by `_nvml_init`; the last one shuts NVML down."""
    global _init_count
    with _init_lock:
        if _init_count == 0:
            return
        _init_count -= 1
        if _init_count == 0:
            try:
                _nvml.nvmlShutdown()
            except pynvml.NVMLError as exc:
                log.debug("nvmlShutdown failed: %s", exc)


def _text(value: Any) -> str | None:
    """NVML strings are bytes in old bindings and str in new ones."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


class _Funnel:
    """The one place NVML functions are called.

    `call` returns the function's result, or None when the value is unknown here:
    NotSupported, NotFound (`if_not_found` instead, e.g. [] for "no samples"), a function this
    driver or binding lacks (logged once, then skipped), or any other NVML error (recorded in
    `errors` for the sample's `error` field). GpuIsLost raises `_GpuLost`.
    """

    def __init__(self) -> None:
        self.missing: set[str] = set()
        self.errors: list[str] = []
        self._logged: set[str] = set()

    def call(
        self, name: str, *args: Any, if_not_found: Any = None, label: str | None = None,
        **kwargs: Any,
    ) -> Any:
        key = label or name
        if key in self.missing:
            return None
        fn = getattr(_nvml, name, None)
        if fn is None:
            self._note_missing(key, "this nvidia-ml-py has no such function")
            return None
        try:
            return fn(*args, **kwargs)
        except pynvml.NVMLError_GpuIsLost as exc:
            raise _GpuLost(key) from exc
        except pynvml.NVMLError_NotFound:
            return if_not_found
        except pynvml.NVMLError_NotSupported:
            return None
        except (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_ArgumentVersionMismatch):
            self._note_missing(key, "the driver does not provide it")
            return None
        except pynvml.NVMLError as exc:
            if getattr(exc, "value", None) == pynvml.NVML_SUCCESS:
                # pynvml raises NVMLError(SUCCESS) when a sized query finds zero entries.
                return if_not_found
            message = f"{key}: {exc}"
            self.errors.append(message)
            if message not in self._logged:
                self._logged.add(message)
                log.warning("NVML call failed: %s", message)
            return None

    def _note_missing(self, key: str, why: str) -> None:
        self.missing.add(key)
        log.info("NVML %s unavailable (%s); its field stays null", key, why)


class NvmlTelemetry:
    """Telemetry of one NVIDIA GPU (or MIG instance) through NVML, opened by UUID.

    Raises TelemetryUnavailable when NVML cannot be initialised or no device has `uuid`.
    On a MIG instance device utilization is not available (util_pct/own_util_pct None,
    extra["mig"] True) and the board readings (temp, power, P-state, SM clock) come from the
    parent GPU.
    """

    backend = "nvml"

    def __init__(self, uuid: str) -> None:
        if not uuid:
            raise TelemetryUnavailable("NVML telemetry needs the device UUID (e.g. GPU-...)")
        self.uuid = uuid
        self._funnel = _Funnel()
        self._closed = False
        _nvml_init()
        try:
            self._handle = self._open_handle(uuid)
            self._mig = bool(self._funnel.call("nvmlDeviceIsMigDeviceHandle", self._handle))
            self._board = self._handle
            if self._mig:
                parent = self._funnel.call("nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
                                           self._handle)
                self._board = parent if parent is not None else self._handle
            self.name = _text(self._funnel.call("nvmlDeviceGetName", self._handle))
        except _GpuLost as exc:
            _nvml_shutdown()
            raise TelemetryUnavailable(f"NVIDIA device {uuid} is lost (fell off the bus)") from exc
        except BaseException:
            _nvml_shutdown()
            raise
        self._last_seen_us = _now_us() - _PROCESS_WINDOW_US

    @staticmethod
    def _open_handle(uuid: str) -> Any:
        try:
            return _nvml.nvmlDeviceGetHandleByUUID(uuid)
        except (pynvml.NVMLError_NotFound, pynvml.NVMLError_InvalidArgument) as exc:
            raise TelemetryUnavailable(
                f"no NVIDIA device with UUID {uuid} visible to NVML"
            ) from exc
        except pynvml.NVMLError as exc:
            raise TelemetryUnavailable(f"cannot open NVIDIA device {uuid}: {exc}") from exc

    def __enter__(self) -> NvmlTelemetry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release this open's NVML reference (idempotent)."""
        if not self._closed:
            self._closed = True
            _nvml_shutdown()

    def sample(self, own_pids: Collection[int] = ()) -> GpuSample:
        """Read the device now.

        `own_pids`: PIDs whose load is the keeper's own (empty = this process); they make up
        `own_util_pct`. Never raises for NVML errors: unknown fields are None, failures are in
        `error`, a lost GPU gives `lost=True`.
        """
        own = set(own_pids) or {os.getpid()}
        self._funnel.errors = []
        try:
            return self._read(own)
        except _GpuLost as exc:
            log.warning("NVIDIA device %s is lost (NVML_ERROR_GPU_IS_LOST in %s)", self.uuid, exc)
            return GpuSample(uuid=self.uuid, name=self.name, lost=True, error="gpu lost")

    def _read(self, own: set[int]) -> GpuSample:
        call = self._funnel.call
        util = None if self._mig else call("nvmlDeviceGetUtilizationRates", self._handle)
        per_pid = self._process_util()
        mem_used, mem_total = self._memory()
        processes = self._processes(per_pid)
        power_mw = call("nvmlDeviceGetPowerUsage", self._board)
        clock = call("nvmlDeviceGetClockInfo", self._board, pynvml.NVML_CLOCK_SM)
        own_util = None
        if per_pid is not None:
            own_util = min(100.0, sum(u for pid, u in per_pid.items() if pid in own))
        extra: dict[str, Any] = {"mig": True} if self._mig else {}
        if processes is not None:
            # False with own work running hints at a PID namespace (container): NVML shows host
            # PIDs, so per-process utilization cannot be attributed here.
            extra["own_pid_visible"] = any(p.pid in own for p in processes)
        return GpuSample(
            uuid=self.uuid,
            name=self.name,
            util_pct=None if util is None else float(util.gpu),
            own_util_pct=own_util,
            mem_used_bytes=mem_used,
            mem_total_bytes=mem_total,
            temp_c=self._temperature(),
            power_w=None if power_mw is None else float(power_mw) / 1000.0,
            pstate=self._pstate(),
            sm_clock_mhz=None if clock is None else float(clock),
            processes=processes,
            error="; ".join(self._funnel.errors) or None,
            extra=extra,
        )

    def _process_util(self) -> dict[int, float] | None:
        """SM utilization (%) per PID from the latest per-process sample; None = unsupported.

        NotFound means no process ran a kernel since the last read: an empty dict (all 0 %).
        """
        if self._mig:
            return None
        since = max(self._last_seen_us, _now_us() - _PROCESS_WINDOW_US)
        samples = self._funnel.call("nvmlDeviceGetProcessUtilization", self._handle, since,
                                    if_not_found=[])
        if samples is None:
            return None
        latest: dict[int, tuple[int, float]] = {}
        for s in samples:
            ts, pid = int(s.timeStamp), int(s.pid)
            if pid not in latest or ts >= latest[pid][0]:
                latest[pid] = (ts, max(0.0, min(100.0, float(s.smUtil))))
            self._last_seen_us = max(self._last_seen_us, ts)
        return {pid: util for pid, (_, util) in latest.items()}

    def _memory(self) -> tuple[int | None, int | None]:
        """(used, total) bytes; the v2 query (used excludes driver-reserved memory) first."""
        version = getattr(_nvml, "nvmlMemory_v2", None)
        info = None
        if version is not None:
            info = self._funnel.call("nvmlDeviceGetMemoryInfo", self._handle, version=version,
                                     label="nvmlDeviceGetMemoryInfo_v2")
        if info is None:
            info = self._funnel.call("nvmlDeviceGetMemoryInfo", self._handle)
        if info is None:
            return None, None
        return int(info.used), int(info.total)

    def _processes(self, per_pid: dict[int, float] | None) -> tuple[GpuProcess, ...] | None:
        """Compute processes with their memory (bytes), SM utilization (%) and real uid."""
        found = self._funnel.call("nvmlDeviceGetComputeRunningProcesses", self._handle)
        if found is None:
            return None
        result = []
        for p in found:
            pid = int(p.pid)
            used = getattr(p, "usedGpuMemory", None)
            result.append(GpuProcess(
                pid=pid,
                used_bytes=None if used is None else int(used),
                util_pct=None if per_pid is None else per_pid.get(pid, 0.0),
                uid=process_uid(pid),
            ))
        return tuple(result)

    def _temperature(self) -> float | None:
        """GPU core temperature in degrees C (nvmlDeviceGetTemperatureV, else the older call)."""
        sensor = pynvml.NVML_TEMPERATURE_GPU
        value = self._funnel.call("nvmlDeviceGetTemperatureV", self._board, sensor)
        if value is None and "nvmlDeviceGetTemperatureV" in self._funnel.missing:
            value = self._funnel.call("nvmlDeviceGetTemperature", self._board, sensor)
        return None if value is None else float(value)

    def _pstate(self) -> str | None:
        """Performance state "P0" (fastest) .. "P15"; None when unknown."""
        value = self._funnel.call("nvmlDeviceGetPerformanceState", self._board)
        if value is None or not 0 <= int(value) <= 15:
            return None
        return f"P{int(value)}"

    def slowdown_temp_c(self) -> float | None:
        """The driver's slowdown temperature threshold in degrees C, None when unknown."""
        try:
            value = self._funnel.call("nvmlDeviceGetTemperatureThreshold", self._board,
                                      pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
        except _GpuLost:
            return None
        return None if value is None else float(value)


def process_uid(pid: int) -> int | None:
    """Real uid of `pid` in this PID namespace; None when it cannot be seen (gone, container)."""
    try:
        return int(psutil.Process(pid).uids().real)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def list_devices() -> list[DeviceInfo]:
    """NVIDIA devices in NVML order (PCI bus order, not CUDA's default FASTEST_FIRST order).

    mem_total_bytes in bytes. Devices NVML cannot open are skipped with a warning.
    Raises TelemetryUnavailable when NVML cannot be initialised.
    """
    _nvml_init()
    try:
        try:
            count = int(_nvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            raise TelemetryUnavailable(f"NVML cannot count devices: {exc}") from exc
        funnel = _Funnel()
        devices = []
        for index in range(count):
            try:
                handle = _nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(_nvml.nvmlDeviceGetUUID(handle))
            except pynvml.NVMLError as exc:
                log.warning("NVML device %d skipped: %s", index, exc)
                continue
            if uuid is None:
                continue
            try:
                name = _text(funnel.call("nvmlDeviceGetName", handle))
                mem = funnel.call("nvmlDeviceGetMemoryInfo", handle)
            except _GpuLost:
                log.warning("NVML device %d (%s) skipped: gpu lost", index, uuid)
                continue
            total = None if mem is None else int(mem.total)
            devices.append(DeviceInfo(index=index, uuid=uuid, name=name, mem_total_bytes=total))
        return devices
    finally:
        _nvml_shutdown()
