"""NVML adapter against a stub binding with named scenarios (real pynvml exception classes)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from keepgpu.telemetry import nvml
from keepgpu.telemetry.base import TelemetryUnavailable
from keepgpu.telemetry.null import NullTelemetry
from keepgpu.telemetry.open import list_devices, open_telemetry

GiB = 1024**3
NOW_US = 1_700_000_000_000_000
OTHER_PID = 4_200_001  # above PID_MAX_LIMIT: never a real process
ME = os.getpid()


def err(code: int) -> pynvml.NVMLError:
    """A real pynvml exception (NVMLError(code) returns the matching subclass)."""
    return pynvml.NVMLError(code)


NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
LOST = pynvml.NVML_ERROR_GPU_IS_LOST
UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
NO_FUNCTION = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND


@dataclass
class StubGpu:
    """One device of the stub binding. `fail[name]` = error code raised by that function, or a
    list of codes/None consumed one per call."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    util: int = 30
    mem_used: int = 10 * GiB
    mem_total: int = 80 * GiB
    temp: int = 45
    power_mw: int = 123_456
    pstate: int = 0
    sm_clock: int = 1980
    procs: list[tuple[int, int | None]] = field(default_factory=lambda: [(ME, 2 * GiB)])
    samples: list[tuple[int, int, int]] = field(default_factory=list)  # pid, ts_us, smUtil
    mig: bool = False
    parent: StubGpu | None = None
    lost: bool = False
    fail: dict[str, Any] = field(default_factory=dict)


class StubNvml:
    """The slice of pynvml that keepgpu.telemetry.nvml uses, over StubGpu devices."""

    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(
        self, *gpus: StubGpu, init_error: int | None = None, absent: frozenset[str] = frozenset()
    ) -> None:
        self.absent = absent  # functions this "older nvidia-ml-py" does not have
        self.gpus = list(gpus)
        self.init_error = init_error
        self.inits = 0
        self.shutdowns = 0
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattribute__(self, name: str) -> Any:
        if name in object.__getattribute__(self, "absent"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise err(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def _dev(self, fn: str, gpu: StubGpu, *args: Any) -> StubGpu:
        self.calls.append((fn, args))
        if gpu.lost:
            raise err(LOST)
        code = gpu.fail.get(fn)
        if isinstance(code, list):
            code = code.pop(0) if code else None
        if code is not None:
            raise err(code)
        return gpu

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> StubGpu:
        return self._dev("nvmlDeviceGetHandleByIndex", self.gpus[index])

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> StubGpu:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise err(NOT_FOUND)

    def nvmlDeviceGetUUID(self, h: StubGpu) -> str:
        return self._dev("nvmlDeviceGetUUID", h).uuid

    def nvmlDeviceGetName(self, h: StubGpu) -> str:
        return self._dev("nvmlDeviceGetName", h).name

    def nvmlDeviceIsMigDeviceHandle(self, h: StubGpu) -> int:
        return int(self._dev("nvmlDeviceIsMigDeviceHandle", h).mig)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h: StubGpu) -> StubGpu:
        parent = self._dev("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", h).parent
        assert parent is not None
        return parent

    def nvmlDeviceGetUtilizationRates(self, h: StubGpu) -> Any:
        return SimpleNamespace(gpu=self._dev("nvmlDeviceGetUtilizationRates", h).util, memory=3)

    def nvmlDeviceGetProcessUtilization(self, h: StubGpu, since: int) -> list[Any]:
        gpu = self._dev("nvmlDeviceGetProcessUtilization", h, since)
        found = [SimpleNamespace(pid=p, timeStamp=ts, smUtil=u, memUtil=0)
                 for p, ts, u in gpu.samples if ts > since]
        if not found:
            raise err(NOT_FOUND)
        return found

    def nvmlDeviceGetMemoryInfo(self, h: StubGpu, version: int | None = None) -> Any:
        fn = "nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo"
        gpu = self._dev(fn, h)
        return SimpleNamespace(used=gpu.mem_used, total=gpu.mem_total,
                               free=gpu.mem_total - gpu.mem_used)

    def nvmlDeviceGetComputeRunningProcesses(self, h: StubGpu) -> list[Any]:
        gpu = self._dev("nvmlDeviceGetComputeRunningProcesses", h)
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in gpu.procs]

    def nvmlDeviceGetTemperatureV(self, h: StubGpu, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._dev("nvmlDeviceGetTemperatureV", h).temp

    def nvmlDeviceGetTemperature(self, h: StubGpu, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._dev("nvmlDeviceGetTemperature", h).temp

    def nvmlDeviceGetTemperatureThreshold(self, h: StubGpu, kind: int) -> int:
        assert kind == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        self._dev("nvmlDeviceGetTemperatureThreshold", h)
        return 87

    def nvmlDeviceGetPowerUsage(self, h: StubGpu) -> int:
        return self._dev("nvmlDeviceGetPowerUsage", h).power_mw

    def nvmlDeviceGetPerformanceState(self, h: StubGpu) -> int:
        return self._dev("nvmlDeviceGetPerformanceState", h).pstate

    def nvmlDeviceGetClockInfo(self, h: StubGpu, kind: int) -> int:
        assert kind == pynvml.NVML_CLOCK_SM
        return self._dev("nvmlDeviceGetClockInfo", h).sm_clock

    def count(self, fn: str) -> int:
        return sum(1 for name, _ in self.calls if name == fn)


UUID = "GPU-11111111-2222-3333-4444-555555555555"


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Put a stub binding in place of pynvml for nvml.py (fresh init count, fixed wall clock)."""
    monkeypatch.setattr(nvml, "_init_count", 0)
    monkeypatch.setattr(nvml, "_now_us", lambda: NOW_US)

    def _install(*gpus: StubGpu, **kwargs: Any) -> StubNvml:
        stub = StubNvml(*gpus, **kwargs)
        monkeypatch.setattr(nvml, "_nvml", stub)
        return stub

    return _install


# --- scenario: a normal GPU -------------------------------------------------------------------


def test_normal_gpu_fills_every_field(install: Any) -> None:
    gpu = StubGpu(UUID, procs=[(ME, 2 * GiB), (OTHER_PID, 3 * GiB)],
                  samples=[(ME, NOW_US - 10, 20), (OTHER_PID, NOW_US - 5, 40)])
    install(gpu)
    with nvml.NvmlTelemetry(UUID) as tel:
        s = tel.sample()
    assert (s.uuid, s.name) == (UUID, "NVIDIA H100 80GB HBM3")
    assert s.util_pct == 30.0
    assert s.own_util_pct == 20.0  # only this process, not the other one
    assert (s.mem_used_bytes, s.mem_total_bytes) == (10 * GiB, 80 * GiB)
    assert s.temp_c == 45.0
    assert s.power_w == pytest.approx(123.456)
    assert s.pstate == "P0"
    assert s.sm_clock_mhz == 1980.0
    assert s.processes is not None
    by_pid = {p.pid: p for p in s.processes}
    assert by_pid[ME].used_bytes == 2 * GiB and by_pid[ME].util_pct == 20.0
    assert by_pid[ME].uid == os.getuid()
    assert by_pid[OTHER_PID].util_pct == 40.0 and by_pid[OTHER_PID].uid is None
    assert s.lost is False and s.error is None
    assert s.extra == {"own_pid_visible": True}


def test_own_pids_sum_and_latest_sample_per_pid_wins(install: Any) -> None:
    gpu = StubGpu(UUID, procs=[(11, 1), (12, 1), (OTHER_PID, 1)],
                  samples=[(11, NOW_US - 900, 90), (11, NOW_US - 100, 10), (12, NOW_US - 50, 15),
                           (OTHER_PID, NOW_US - 10, 50)])
    install(gpu)
    tel = nvml.NvmlTelemetry(UUID)
    s = tel.sample(own_pids=[11, 12])
    assert s.own_util_pct == 25.0
    assert s.extra["own_pid_visible"] is True


def test_last_timestamp_is_kept_and_not_found_means_zero(install: Any) -> None:
    gpu = StubGpu(UUID, samples=[(ME, NOW_US - 300, 30), (ME, NOW_US - 200, 35)])
    stub = install(gpu)
    tel = nvml.NvmlTelemetry(UUID)
    assert tel.sample().own_util_pct == 35.0
    # Nothing newer than the last seen sample: NVML answers NotFound = nothing ran.
    s = tel.sample()
    since = [args[0] for name, args in stub.calls if name == "nvmlDeviceGetProcessUtilization"]
    assert since == [NOW_US - 1_000_000, NOW_US - 200]
    assert s.own_util_pct == 0.0
    assert s.processes is not None and s.processes[0].util_pct == 0.0
    assert s.error is None


def test_per_process_unsupported_gives_none_not_zero(install: Any) -> None:
    install(StubGpu(UUID, fail={"nvmlDeviceGetProcessUtilization": NOT_SUPPORTED}))
    s = nvml.NvmlTelemetry(UUID).sample()
    assert s.own_util_pct is None
    assert s.processes is not None and s.processes[0].util_pct is None
    assert s.util_pct == 30.0 and s.error is None


def test_success_with_no_entries_means_nothing_ran(install: Any) -> None:
    # pynvml raises NVMLError(NVML_SUCCESS) when the sized query finds zero samples.
    install(StubGpu(UUID, fail={"nvmlDeviceGetProcessUtilization": pynvml.NVML_SUCCESS}))
    s = nvml.NvmlTelemetry(UUID).sample()
    assert s.own_util_pct == 0.0 and s.error is None


# --- scenario: a GPU without power and temperature readings ------------------------------------


def test_power_and_temperature_not_supported_are_null(install: Any) -> None:
    install(StubGpu(UUID, fail={"nvmlDeviceGetPowerUsage": NOT_SUPPORTED,
                                "nvmlDeviceGetTemperatureV": NOT_SUPPORTED}))
    s = nvml.NvmlTelemetry(UUID).sample()
    assert s.power_w is None and s.temp_c is None
    assert s.util_pct == 30.0 and s.mem_used_bytes == 10 * GiB
    assert s.error is None  # "not supported" is not an error


def test_missing_function_falls_back_and_is_logged_once(
    install: Any, caplog: pytest.LogCaptureFixture
) -> None:
    stub = install(StubGpu(UUID, fail={"nvmlDeviceGetTemperatureV": NO_FUNCTION,
                                       "nvmlDeviceGetMemoryInfo_v2": NO_FUNCTION}))
    tel = nvml.NvmlTelemetry(UUID)
    with caplog.at_level(logging.INFO, logger=nvml.__name__):
        first, second = tel.sample(), tel.sample()
    for s in (first, second):
        assert s.temp_c == 45.0  # from the older nvmlDeviceGetTemperature
        assert s.mem_total_bytes == 80 * GiB  # from the v1 memory query
        assert s.error is None
    assert stub.count("nvmlDeviceGetTemperatureV") == 1  # not retried once known missing
    assert stub.count("nvmlDeviceGetMemoryInfo_v2") == 1
    assert stub.count("nvmlDeviceGetMemoryInfo") == 2
    assert sum("nvmlDeviceGetTemperatureV" in r.message for r in caplog.records) == 1


def test_function_absent_from_binding_is_null(install: Any) -> None:
    install(StubGpu(UUID), absent=frozenset({"nvmlDeviceGetClockInfo", "nvmlMemory_v2"}))
    s = nvml.NvmlTelemetry(UUID).sample()
    assert s.sm_clock_mhz is None and s.error is None
    assert s.util_pct == 30.0
    assert s.mem_total_bytes == 80 * GiB  # v1 memory query when the binding has no v2


def test_unknown_pstate_is_null(install: Any) -> None:
    install(StubGpu(UUID, pstate=pynvml.NVML_PSTATE_UNKNOWN))
    assert nvml.NvmlTelemetry(UUID).sample().pstate is None


# --- scenario: GPU lost mid-run ----------------------------------------------------------------


def test_gpu_lost_mid_run(install: Any) -> None:
    gpu = StubGpu(UUID)
    install(gpu)
    tel = nvml.NvmlTelemetry(UUID)
    assert tel.sample().lost is False
    gpu.lost = True
    s = tel.sample()
    assert s.lost is True and s.error == "gpu lost" and s.uuid == UUID
    assert s.util_pct is None and s.mem_used_bytes is None and s.processes is None
    assert tel.slowdown_temp_c() is None


def test_gpu_lost_at_open_is_unavailable(install: Any) -> None:
    stub = install(StubGpu(UUID, lost=True))
    with pytest.raises(TelemetryUnavailable, match="lost"):
        nvml.NvmlTelemetry(UUID)
    assert stub.inits == stub.shutdowns == 1


# --- scenario: a MIG instance ------------------------------------------------------------------


def test_mig_device_has_no_utilization_and_board_readings_from_parent(install: Any) -> None:
    parent = StubGpu("GPU-parent", temp=61, power_mw=300_000)
    mig = StubGpu("MIG-aaaa", mig=True, parent=parent, samples=[(ME, NOW_US - 1, 50)],
                  fail={"nvmlDeviceGetTemperatureV": NOT_SUPPORTED,
                        "nvmlDeviceGetPowerUsage": NOT_SUPPORTED})
    stub = install(parent, mig)
    s = nvml.NvmlTelemetry("MIG-aaaa").sample()
    assert s.util_pct is None and s.own_util_pct is None
    assert s.extra["mig"] is True
    assert s.temp_c == 61.0 and s.power_w == 300.0
    assert s.mem_total_bytes == 80 * GiB
    assert stub.count("nvmlDeviceGetUtilizationRates") == 0
    assert stub.count("nvmlDeviceGetProcessUtilization") == 0


# --- scenario: NVML errors intermittently -----------------------------------------------------


def test_intermittent_error_is_null_plus_error_then_recovers(
    install: Any, caplog: pytest.LogCaptureFixture
) -> None:
    install(StubGpu(UUID, fail={"nvmlDeviceGetUtilizationRates": [UNKNOWN, None, UNKNOWN]}))
    tel = nvml.NvmlTelemetry(UUID)
    with caplog.at_level(logging.WARNING, logger=nvml.__name__):
        bad, good, bad_again = tel.sample(), tel.sample(), tel.sample()
    assert bad.util_pct is None
    assert bad.error is not None and "nvmlDeviceGetUtilizationRates" in bad.error
    assert bad.mem_used_bytes == 10 * GiB and bad.temp_c == 45.0  # other fields unaffected
    assert good.util_pct == 30.0 and good.error is None
    assert bad_again.error == bad.error
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


# --- opening, reference counting, listing ------------------------------------------------------


def test_unknown_uuid_is_unavailable_and_releases_nvml(install: Any) -> None:
    stub = install(StubGpu(UUID))
    with pytest.raises(TelemetryUnavailable, match="GPU-nope"):
        nvml.NvmlTelemetry("GPU-nope")
    assert stub.inits == 1 and stub.shutdowns == 1
    assert nvml._init_count == 0


def test_init_failure_is_unavailable(install: Any) -> None:
    install(StubGpu(UUID), init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(TelemetryUnavailable, match="NVML unavailable"):
        nvml.NvmlTelemetry(UUID)
    with pytest.raises(TelemetryUnavailable):
        nvml.list_devices()


def test_init_is_reference_counted(install: Any) -> None:
    stub = install(StubGpu(UUID), StubGpu("GPU-two"))
    a, b = nvml.NvmlTelemetry(UUID), nvml.NvmlTelemetry("GPU-two")
    assert stub.inits == 1
    a.close()
    a.close()  # idempotent
    assert stub.shutdowns == 0
    assert b.sample().util_pct == 30.0
    b.close()
    assert stub.shutdowns == 1
    assert nvml.list_devices()[0].uuid == UUID
    assert (stub.inits, stub.shutdowns) == (2, 2)


def test_list_devices_skips_unreadable_device(install: Any) -> None:
    no_permission = {"nvmlDeviceGetHandleByIndex": pynvml.NVML_ERROR_NO_PERMISSION}
    install(StubGpu(UUID, name="A100"),
            StubGpu("GPU-bad", fail=no_permission),
            StubGpu("GPU-three", mem_total=24 * GiB, fail={"nvmlDeviceGetName": NOT_SUPPORTED}))
    devices = list_devices("nvidia")
    assert [(d.index, d.uuid, d.name, d.mem_total_bytes) for d in devices] == [
        (0, UUID, "A100", 80 * GiB),
        (2, "GPU-three", None, 24 * GiB),
    ]


def test_slowdown_threshold(install: Any) -> None:
    install(StubGpu(UUID))
    assert nvml.NvmlTelemetry(UUID).slowdown_temp_c() == 87.0


def test_open_telemetry_factory(install: Any) -> None:
    install(StubGpu(UUID))
    tel = open_telemetry("nvml", UUID)
    assert tel.backend == "nvml" and tel.sample().uuid == UUID
    tel.close()
    null = open_telemetry("null", None)
    assert isinstance(null, NullTelemetry) and null.sample().util_pct is None
    with pytest.raises(TelemetryUnavailable, match="UUID"):
        open_telemetry("nvml", None)
    with pytest.raises(ValueError, match="unknown telemetry backend"):
        open_telemetry("nvidia-smi", UUID)
    with pytest.raises(ValueError, match="unknown GPU vendor"):
        list_devices("intel")


# --- the real binding on this machine ----------------------------------------------------------


def _real_nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_real_binding_without_driver_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvml, "_nvml", pynvml)
    monkeypatch.setattr(nvml, "_init_count", 0)
    if _real_nvml_works():
        # A GPU machine: a UUID no device has is still refused cleanly.
        with pytest.raises(TelemetryUnavailable, match="no NVIDIA device"):
            nvml.NvmlTelemetry("GPU-00000000-0000-0000-0000-000000000000")
        assert all(d.uuid for d in nvml.list_devices())
        return
    with pytest.raises(TelemetryUnavailable, match="NVML unavailable"):
        nvml.NvmlTelemetry("GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(TelemetryUnavailable, match="NVML unavailable"):
        list_devices("nvidia")
    assert nvml._init_count == 0


def test_import_has_no_side_effects() -> None:
    code = (
        "import sys, pynvml\n"
        "import keepgpu.telemetry, keepgpu.telemetry.nvml, keepgpu.telemetry.amd\n"
        "import keepgpu.telemetry.fake, keepgpu.telemetry.open\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'amdsmi' not in sys.modules, 'amdsmi imported'\n"
        "assert pynvml.nvmlLib is None, 'NVML loaded at import'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
