"""NVML telemetry (nvidia-ml-py): one NVIDIA device opened by UUID.

Every vendor call goes through one funnel, `_Funnel.call`, which turns "not supported here" into
None, logs a function the driver lacks once, turns NVML_ERROR_GPU_IS_LOST into a lost sample and
any other NVML error into None plus an `error` string on the sample. Nothing happens at import
time: `import pynvml` works without a driver; NVML is initialised by the first open.

Tests replace `_nvml` (the binding every call is looked up on) with a fake pynvml
(tests/fakes/fake_pynvml.py) that returns the real ctypes structs and raises the real
`pynvml.NVMLError_*` exceptions.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Collection
from typing import Any

import psutil
import pynvml

from keepgpu.telemetry.base import GpuProcess, GpuSample, TelemetryUnavailable

log = logging.getLogger(__name__)

#: The NVML binding every call is looked up on (tests swap in a stub).
_nvml: Any = pynvml

# A pid's newest per-process sample counts as its load for this long. NVML stamps each pid's
# samples on its own schedule (gaps of seconds between pids are seen), so "nothing new for this
# pid since the last read" does not mean it went idle; a pid with no sample this recent did.
_PROCESS_HOLD_US = 5_000_000

# PROC_PID_INIT_INO (linux include/linux/proc_ns.h): the inode of the initial PID namespace,
# fixed since Linux 3.8. NVML reports pids as the driver sees them, in that namespace.
_INIT_PID_NS_INO = 0xEFFFFFFC

# pynvml's throwOnVersionMismatch raises this (not an NVMLError) from unversioned calls such as
# nvmlDeviceGetComputeRunningProcesses when the driver lacks the version the binding wants;
# older bindings do not have it.
_LibraryMismatch: type[Exception] = getattr(
    pynvml, "NVMLLibraryMismatchError", pynvml.NVMLError_FunctionNotFound
)

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
        except (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_ArgumentVersionMismatch,
                _LibraryMismatch):
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
        # pid -> (timestamp µs, smUtil %) of its newest per-process sample: "last seen" is
        # tracked per pid because NVML's timestamps differ per pid.
        self._seen: dict[int, tuple[int, float]] = {}

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
        mem_used, mem_total, mem_free = self._memory()
        host_pids = in_initial_pid_namespace()
        processes = self._processes(per_pid, host_pids)
        power_mw = call("nvmlDeviceGetPowerUsage", self._board)
        clock = call("nvmlDeviceGetClockInfo", self._board, pynvml.NVML_CLOCK_SM)
        own_util = None
        if per_pid is not None and host_pids:
            own_util = min(100.0, sum(u for pid, u in per_pid.items() if pid in own))
        extra: dict[str, Any] = {"mig": True} if self._mig else {}
        if processes is not None:
            # In a PID namespace of our own (container) NVML's pids are the host's: a match
            # with one of ours may be another process (a collision), so nothing is attributed.
            extra["own_pid_visible"] = host_pids and any(p.pid in own for p in processes)
        return GpuSample(
            uuid=self.uuid,
            name=self.name,
            util_pct=None if util is None else float(util.gpu),
            own_util_pct=own_util,
            mem_used_bytes=mem_used,
            mem_total_bytes=mem_total,
            mem_free_reported_bytes=mem_free,
            temp_c=self._temperature(),
            power_w=None if power_mw is None else float(power_mw) / 1000.0,
            pstate=self._pstate(),
            sm_clock_mhz=None if clock is None else float(clock),
            processes=processes,
            error="; ".join(self._funnel.errors) or None,
            extra=extra,
        )

    def _process_util(self) -> dict[int, float] | None:
        """SM utilization (%) per PID: each pid's newest sample of the last _PROCESS_HOLD_US
        (timestamps are CPU µs); None = unsupported (and on MIG, which has none).

        NVML returns the samples newer than the timestamp passed. That one timestamp is the hold
        horizon, not the newest sample seen: a pid stamped earlier than another pid's newest
        sample would otherwise never be returned, and would read 0. NotFound (or pynvml's
        NVMLError(SUCCESS)) = no sample that recent: nothing ran, an empty dict.
        """
        if self._mig:
            return None
        horizon = _now_us() - _PROCESS_HOLD_US
        samples = self._funnel.call("nvmlDeviceGetProcessUtilization", self._handle, horizon,
                                    if_not_found=[])
        if samples is None:
            return None
        for s in samples:
            ts, pid = int(s.timeStamp), int(s.pid)
            seen = self._seen.get(pid)
            if seen is None or ts >= seen[0]:
                self._seen[pid] = (ts, max(0.0, min(100.0, float(s.smUtil))))
        self._seen = {pid: seen for pid, seen in self._seen.items() if seen[0] > horizon}
        return {pid: util for pid, (_, util) in self._seen.items()}

    def _memory(self) -> tuple[int | None, int | None, int | None]:
        """(used, total, free) bytes; the v2 query first (its used and free both leave out the
        driver-reserved memory), v1 where the driver or binding has no v2."""
        version = getattr(_nvml, "nvmlMemory_v2", None)
        info = None
        if version is not None:
            info = self._funnel.call("nvmlDeviceGetMemoryInfo", self._handle, version=version,
                                     label="nvmlDeviceGetMemoryInfo_v2")
        if info is None:
            info = self._funnel.call("nvmlDeviceGetMemoryInfo", self._handle)
        if info is None:
            return None, None, None
        return int(info.used), int(info.total), int(info.free)

    def _processes(
        self, per_pid: dict[int, float] | None, host_pids: bool
    ) -> tuple[GpuProcess, ...] | None:
        """Compute processes with their memory (bytes), SM utilization (%) and real uid.

        The uid is looked up only when our pids are the driver's (`host_pids`): in a container
        a host pid can name an unrelated local process, so its owner stays None (unknown,
        which the pressure rule treats as another user's).
        """
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
                uid=process_uid(pid) if host_pids else None,
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


@functools.cache
def in_initial_pid_namespace() -> bool:
    """True when this process lives in the initial PID namespace, where NVML's pids are ours.

    Checked by the inode of /proc/self/ns/pid (PROC_PID_INIT_INO). Comparing with
    /proc/1/ns/pid would not do: in a container pid 1 is the container's init. False when it
    cannot be read (the safe side: owners unknown).
    """
    try:
        return os.stat("/proc/self/ns/pid").st_ino == _INIT_PID_NS_INO
    except OSError:
        return False


def process_uid(pid: int) -> int | None:
    """Real uid of `pid` in this PID namespace; None when it cannot be seen (gone, container)."""
    try:
        return int(psutil.Process(pid).uids().real)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
