"""AMD SMI telemetry (the `amdsmi` Python package from ROCm): one AMD GPU opened by UUID.

`amdsmi` is imported lazily and guarded: without ROCm its import prints to stdout and raises
KeyError('libamd_smi.so'); that output is captured and the failure becomes TelemetryUnavailable.
Every vendor call goes through one funnel, `_Funnel.call`: "not supported"/"no data" statuses
become None, a function this amdsmi lacks is logged once, other AMD SMI errors become None plus
an `error` string on the sample.

Identity: the supervisor passes amdsmi's UUID (or ROCr's ``GPU-<16 hex>``); torch's hex form is
decoded by `uuid_from_hip` (see keepgpu.telemetry.amd_ids for the three spellings).
Versions: the PyPI wrapper is plain ctypes over whatever libamd_smi.so is installed, with no
check of its own; a 7.x wrapper over a ROCm 6 library reads mismatched structs (garbage or a
crash), so the first open compares the wrapper's version with ROCm's and refuses a mismatch.

Tests set `_amdsmi` (the binding every call is looked up on) to a fake module
(tests/fakes/fake_amdsmi.py) that mirrors the real package's API.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from keepgpu.telemetry.amd_ids import rocr_form, rocr_from_amdsmi, uuid_from_hip
from keepgpu.telemetry.amd_procs import kfd_pids, process_uid
from keepgpu.telemetry.amd_version import check_versions
from keepgpu.telemetry.base import DeviceInfo, GpuProcess, GpuSample, TelemetryUnavailable

__all__ = ["AmdTelemetry", "list_devices", "uuid_from_hip"]

log = logging.getLogger(__name__)

#: The amdsmi binding; None until first needed (then imported by `_binding`). Tests set a stub.
_amdsmi: Any = None

# amdsmi_status_t values (amdsmi.h, stable C ABI) that mean "this value does not exist here".
_STATUS_NOT_SUPPORTED = 2
_STATUS_NOT_YET_IMPLEMENTED = 3
_STATUS_NO_DATA = 40
_ABSENT_STATUSES = frozenset({_STATUS_NOT_SUPPORTED, _STATUS_NOT_YET_IMPLEMENTED, _STATUS_NO_DATA})

# amdsmi_get_gpu_vram_usage reports MiB (the C library divides bytes by 1024*1024, rounding
# down); amdsmi_get_gpu_memory_total/usage give bytes and are preferred.
_MIB = 1024 * 1024

_init_lock = threading.Lock()
_init_count = 0


def _import_amdsmi() -> Any:
    """Import `amdsmi` with its stdout/stderr chatter captured.

    Raises TelemetryUnavailable when the package or libamd_smi.so (ROCm) is missing.
    """
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            import amdsmi
    except ImportError as exc:
        raise TelemetryUnavailable(
            "AMD SMI unavailable: the amdsmi Python package is not installed "
            "(install the one of your ROCm: pip install 'keepgpu[rocm6]' or 'keepgpu[rocm7]')"
        ) from exc
    except (KeyError, OSError) as exc:
        said = " ".join(chatter.getvalue().split())
        raise TelemetryUnavailable(
            f"AMD SMI unavailable: amdsmi cannot load libamd_smi.so ({exc!r}; is ROCm installed?)"
            + (f" amdsmi said: {said}" if said else "")
        ) from exc
    if chatter.getvalue().strip():
        log.debug("amdsmi import said: %s", chatter.getvalue().strip())
    return amdsmi


def _binding() -> Any:
    """The amdsmi module (imported on first use). Raises TelemetryUnavailable."""
    global _amdsmi
    if _amdsmi is None:
        _amdsmi = _import_amdsmi()
    return _amdsmi


def _amd_init() -> Any:
    """Initialise AMD SMI once for all opens in this process (reference-counted).

    Returns the binding. Raises TelemetryUnavailable when the library or driver is missing.
    """
    global _init_count
    binding = _binding()
    with _init_lock:
        if _init_count == 0:
            check_versions(binding)
            try:
                binding.amdsmi_init()
            except binding.AmdSmiException as exc:
                raise TelemetryUnavailable(
                    f"AMD SMI cannot initialise: {_describe(exc)} (amdgpu driver loaded?)"
                ) from exc
        _init_count += 1
    return binding


def _amd_shutdown() -> None:
    """Drop one reference taken by `_amd_init`; the last one shuts AMD SMI down."""
    global _init_count
    with _init_lock:
        if _init_count == 0:
            return
        _init_count -= 1
        if _init_count == 0 and _amdsmi is not None:
            try:
                _amdsmi.amdsmi_shut_down()
            except _amdsmi.AmdSmiException as exc:
                log.debug("amdsmi_shut_down failed: %s", _describe(exc))


def _describe(exc: BaseException) -> str:
    """One line for an AMD SMI exception (its status name when it has one)."""
    info = getattr(exc, "err_info", None)
    if info:
        return str(info)
    return " ".join(str(exc).split()) or type(exc).__name__


def _number(value: Any) -> float | None:
    """amdsmi writes "N/A" for unknown numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _ids(funnel: _Funnel, handle: Any) -> tuple[str | None, str | None]:
    """(amdsmi UUID, ROCr "GPU-<16 hex>") of one handle; either may be unknown.

    ROCr's id comes from the enumeration info's hip_uuid (amdsmi >= 6.4), else it is read back
    out of the amdsmi UUID, else from the asic serial (both carry the same 64-bit unique id).
    """
    uuid = funnel.call("amdsmi_get_gpu_device_uuid", handle)
    uuid = uuid.strip().lower() if isinstance(uuid, str) and uuid.strip() else None
    enum = funnel.call("amdsmi_get_gpu_enumeration_info", handle)
    hip = enum.get("hip_uuid") if isinstance(enum, Mapping) else None
    rocr = rocr_form(hip) if isinstance(hip, str) else None
    if rocr is None and uuid is not None:
        rocr = rocr_from_amdsmi(uuid)
    if rocr is None:
        asic = funnel.call("amdsmi_get_gpu_asic_info", handle)
        serial = asic.get("asic_serial") if isinstance(asic, Mapping) else None
        rocr = rocr_form(serial) if isinstance(serial, str) else None
    return uuid, rocr


class _Funnel:
    """The one place amdsmi functions are called: result, or None when unknown.

    Absent statuses (not supported, not implemented, no data) and missing functions (logged
    once) give None; other AMD SMI errors give None and are recorded in `errors`.
    """

    def __init__(self) -> None:
        self.missing: set[str] = set()
        self.errors: list[str] = []
        self._logged: set[str] = set()

    def call(self, name: str, *args: Any) -> Any:
        if name in self.missing:
            return None
        binding = _binding()
        fn = getattr(binding, name, None)
        if fn is None:
            self.missing.add(name)
            log.info("amdsmi has no %s; its field stays null", name)
            return None
        try:
            return fn(*args)
        except binding.AmdSmiLibraryException as exc:
            if exc.get_error_code() in _ABSENT_STATUSES:
                return None
            self._error(name, exc)
        except binding.AmdSmiException as exc:
            self._error(name, exc)
        return None

    def _error(self, name: str, exc: BaseException) -> None:
        message = f"{name}: {_describe(exc)}"
        self.errors.append(message)
        if message not in self._logged:
            self._logged.add(message)
            log.warning("AMD SMI call failed: %s", message)


class AmdTelemetry:
    """Telemetry of one AMD GPU through AMD SMI, opened by UUID.

    The UUID may be amdsmi's own (amdsmi_get_gpu_device_uuid), ROCr's "GPU-<unique id>", or
    torch's hex of it (decoded by `uuid_from_hip`).
    Raises TelemetryUnavailable when amdsmi is missing, mismatches ROCm, cannot init, or no GPU
    matches. Per-process utilization is unknown (None) for KFD (ROCm compute) processes, whose
    HIP work amdsmi cannot see, so the worker judges others' load by its quiet probe; for other
    processes it is derived from their cumulative GFX engine time (none on the first sample).
    AMD SMI has no "GPU lost" status: a vanished device shows as `error`, not `lost`.
    """

    backend = "amdsmi"

    def __init__(self, uuid: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not uuid:
            raise TelemetryUnavailable("AMD SMI telemetry needs the device UUID")
        self._clock = clock  # seconds, monotonic: the time base of per-process utilization
        self.uuid = uuid
        self._funnel = _Funnel()
        self._closed = False
        self._binding = _amd_init()
        try:
            self._handle = self._find(uuid)
            asic = self._funnel.call("amdsmi_get_gpu_asic_info", self._handle)
            self.name = None
            if isinstance(asic, Mapping) and asic.get("market_name") not in (None, "", "N/A"):
                self.name = str(asic["market_name"])
        except BaseException:
            _amd_shutdown()
            raise
        self._prev_gfx_ns: dict[int, int] = {}
        self._prev_at_s: float | None = None

    def _find(self, uuid: str) -> Any:
        """The handle whose amdsmi UUID is `uuid`, else the one ROCr id `uuid` stands for.

        Partitions of one GPU (CPX mode) share ROCr's id: that form must name exactly one.
        """
        exact = uuid.strip().lower()
        wanted = rocr_form(exact)
        handles = self._funnel.call("amdsmi_get_processor_handles") or []
        by_rocr = []
        for handle in handles:
            amdsmi_uuid, rocr = _ids(self._funnel, handle)
            if amdsmi_uuid == exact:
                return handle
            if wanted is not None and rocr == wanted:
                by_rocr.append(handle)
        if len(by_rocr) == 1:
            return by_rocr[0]
        if by_rocr:
            raise TelemetryUnavailable(
                f"AMD GPU id {uuid} ({wanted}) names {len(by_rocr)} AMD SMI devices "
                "(partitions of one GPU): give the amdsmi UUID instead"
            )
        raise TelemetryUnavailable(
            f"no AMD GPU with UUID {uuid} visible to AMD SMI ({len(handles)} GPU(s) seen)"
        )

    def __enter__(self) -> AmdTelemetry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release this open's AMD SMI reference (idempotent)."""
        if not self._closed:
            self._closed = True
            _amd_shutdown()

    def sample(self, own_pids: Collection[int] = ()) -> GpuSample:
        """Read the device now. `own_pids` as for NVML (empty = this process).

        Never raises for AMD SMI errors: unknown fields are None, failures are in `error`.
        """
        own = set(own_pids) or {os.getpid()}
        self._funnel.errors = []
        call = self._funnel.call
        activity = call("amdsmi_get_gpu_activity", self._handle)
        util = _number(activity.get("gfx_activity")) if isinstance(activity, Mapping) else None
        used, total = self._memory()
        clock = call("amdsmi_get_clock_info", self._handle, self._binding.AmdSmiClkType.GFX)
        processes = self._processes()
        own_util = None
        mine = [p.util_pct for p in processes or () if p.pid in own]
        if processes is not None and None not in mine:
            own_util = min(100.0, sum(u for u in mine if u is not None))
        return GpuSample(
            uuid=self.uuid,
            name=self.name,
            util_pct=util,
            own_util_pct=own_util,
            mem_used_bytes=used,
            mem_total_bytes=total,
            temp_c=self._temperature(),
            power_w=self._power(),
            pstate=None,
            sm_clock_mhz=_number(clock.get("clk")) if isinstance(clock, Mapping) else None,
            processes=processes,
            error="; ".join(self._funnel.errors) or None,
            extra={} if processes is None else {
                "own_pid_visible": any(p.pid in own for p in processes)},
        )

    def _memory(self) -> tuple[int | None, int | None]:
        """(used, total) VRAM in bytes: exact byte counts where this amdsmi has them, else
        vram_usage's MiB (used rounds down there, so free would read up to 1 MiB high)."""
        kind = getattr(self._binding, "AmdSmiMemoryType", None)
        if kind is not None:
            total = _number(self._funnel.call("amdsmi_get_gpu_memory_total", self._handle,
                                              kind.VRAM))
            used = _number(self._funnel.call("amdsmi_get_gpu_memory_usage", self._handle,
                                             kind.VRAM))
            if total is not None and used is not None:
                return int(used), int(total)
        vram = self._funnel.call("amdsmi_get_gpu_vram_usage", self._handle)
        if not isinstance(vram, Mapping):
            return None, None
        used_mib, total_mib = _number(vram.get("vram_used")), _number(vram.get("vram_total"))
        return (None if used_mib is None else int(used_mib) * _MIB,
                None if total_mib is None else int(total_mib) * _MIB)

    def _temperature(self) -> float | None:
        """Edge temperature in degrees C; hotspot (junction) where there is no edge sensor."""
        kinds, metric = self._binding.AmdSmiTemperatureType, self._binding.AmdSmiTemperatureMetric
        for sensor in (kinds.EDGE, kinds.HOTSPOT):
            value = _number(self._funnel.call("amdsmi_get_temp_metric", self._handle, sensor,
                                              metric.CURRENT))
            if value is not None:
                return value
        return None

    def _power(self) -> float | None:
        """Socket power in watts (current where reported, else the average)."""
        info = self._funnel.call("amdsmi_get_power_info", self._handle)
        if not isinstance(info, Mapping):
            return None
        for key in ("current_socket_power", "average_socket_power", "socket_power"):
            value = _number(info.get(key))
            if value is not None and value != 0xFFFF:
                return value
        return None

    def _processes(self) -> tuple[GpuProcess, ...] | None:
        """Processes with VRAM (bytes), GFX utilization (%) since the last sample, and uid."""
        found = self._funnel.call("amdsmi_get_gpu_process_list", self._handle)
        if found is None:
            return None
        now = self._clock()
        elapsed_ns = None if self._prev_at_s is None else (now - self._prev_at_s) * 1e9
        gfx_ns: dict[int, int] = {}
        kfd = kfd_pids()  # None: cannot tell, so every process may be a blind KFD one
        result = []
        for item in found:
            info = item if isinstance(item, Mapping) else self._funnel.call(
                "amdsmi_get_gpu_process_info", self._handle, item)  # amdsmi < 6.1 gave handles
            if not isinstance(info, Mapping) or _number(info.get("pid")) is None:
                continue
            pid = int(info["pid"])
            engine = info.get("engine_usage")
            busy = _number(engine.get("gfx")) if isinstance(engine, Mapping) else None
            util = None  # unknown until a second sample gives a baseline
            if busy is not None and kfd is not None and pid not in kfd:
                gfx_ns[pid] = int(busy)
                if elapsed_ns and pid in self._prev_gfx_ns:
                    delta = max(0, int(busy) - self._prev_gfx_ns[pid])
                    util = min(100.0, 100.0 * delta / elapsed_ns)
            memory = info.get("memory_usage")
            vram = _number(memory.get("vram_mem")) if isinstance(memory, Mapping) else None
            if vram is None:
                vram = _number(info.get("mem"))
            result.append(GpuProcess(pid=pid, used_bytes=None if vram is None else int(vram),
                                     util_pct=util, uid=process_uid(pid)))
        self._prev_gfx_ns, self._prev_at_s = gfx_ns, now
        return tuple(result)


def list_devices() -> list[DeviceInfo]:
    """AMD GPUs in ROCr's enumeration order (what ROCR_VISIBLE_DEVICES indices count).

    `index` is the HIP/ROCr ordinal from amdsmi's enumeration info where every device has one,
    else the AMD SMI position; `uuid` is amdsmi's UUID; `runtime_id` ROCr's "GPU-<16 hex>";
    mem_total_bytes in bytes. Raises TelemetryUnavailable when amdsmi is missing, mismatches
    ROCm or cannot initialise.
    """
    _amd_init()
    try:
        funnel = _Funnel()
        handles = funnel.call("amdsmi_get_processor_handles") or []
        rows = [(handle, *_ids(funnel, handle)) for handle in handles]
        hip_ids = [_hip_id(funnel, handle) for handle in handles]
        order = [i for i in hip_ids if i is not None]
        if sorted(order) != list(range(len(handles))):
            log.debug("AMD SMI gives no complete HIP ordering (%s): AMD SMI order used", hip_ids)
            order = list(range(len(handles)))
        devices = []
        for index, (handle, uuid, rocr) in sorted(zip(order, rows, strict=True)):
            if uuid is None and rocr is None:
                log.warning("AMD GPU %d skipped: no UUID", index)
                continue
            asic = funnel.call("amdsmi_get_gpu_asic_info", handle)
            name = asic.get("market_name") if isinstance(asic, Mapping) else None
            devices.append(DeviceInfo(
                index=index, uuid=uuid or str(rocr),
                name=None if name in (None, "", "N/A") else str(name),
                mem_total_bytes=_total_bytes(funnel, handle), runtime_id=rocr,
            ))
        return devices
    finally:
        _amd_shutdown()


def _hip_id(funnel: _Funnel, handle: Any) -> int | None:
    enum = funnel.call("amdsmi_get_gpu_enumeration_info", handle)
    value = enum.get("hip_id") if isinstance(enum, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _total_bytes(funnel: _Funnel, handle: Any) -> int | None:
    kind = getattr(_binding(), "AmdSmiMemoryType", None)
    if kind is not None:
        total = _number(funnel.call("amdsmi_get_gpu_memory_total", handle, kind.VRAM))
        if total is not None:
            return int(total)
    vram = funnel.call("amdsmi_get_gpu_vram_usage", handle)
    total_mib = _number(vram.get("vram_total")) if isinstance(vram, Mapping) else None
    return None if total_mib is None else int(total_mib) * _MIB
