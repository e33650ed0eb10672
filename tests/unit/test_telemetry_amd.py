"""AMD SMI adapter against a stub `amdsmi` module, and the guarded import of the real one."""

from __future__ import annotations

import enum
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keepgpu.telemetry import amd, amd_procs
from keepgpu.telemetry.base import TelemetryUnavailable
from keepgpu.telemetry.open import list_devices, open_telemetry

MiB = 1024**2
ME = os.getpid()
OTHER_PID = 4_200_001
UUID = "5fff74a1-0000-1000-80d5-c8b4f0d0e9bf"

NOT_SUPPORTED = 2
API_FAILED = 8  # AMDSMI_STATUS_API_FAILED


class AmdSmiException(Exception):
    pass


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code: int) -> None:
        super().__init__(err_code)
        self.err_code = err_code
        self.err_info = f"AMDSMI_STATUS_{err_code} - stub"

    def get_error_code(self) -> int:
        return self.err_code


class AmdSmiTemperatureType(enum.IntEnum):
    EDGE = 0
    HOTSPOT = 1


class AmdSmiTemperatureMetric(enum.IntEnum):
    CURRENT = 0


class AmdSmiClkType(enum.IntEnum):
    GFX = 1


@dataclass
class StubAmdGpu:
    """`fail[name]` = status raised by that function, or a list consumed one per call."""

    uuid: str = UUID
    serial: str = "0xc8b4f0d0e9bf1234"
    market_name: str = "AMD Instinct MI300X"
    gfx: Any = 40
    vram_used_mib: int = 4096
    vram_total_mib: int = 196_592
    temps: dict[int, int] = field(default_factory=lambda: {0: 50, 1: 70})
    power: dict[str, Any] = field(default_factory=lambda: {
        "current_socket_power": "N/A", "average_socket_power": 210, "socket_power": 0})
    clock_mhz: int = 2100
    procs: list[dict[str, Any]] = field(default_factory=list)
    fail: dict[str, Any] = field(default_factory=dict)


def proc(pid: int, gfx_ns: int, vram: int = 1024 * MiB) -> dict[str, Any]:
    """One amdsmi 7 process entry: cumulative GFX engine time (ns) and VRAM (bytes)."""
    return {"name": "python", "pid": pid, "mem": vram + 5,
            "engine_usage": {"gfx": gfx_ns, "enc": 0},
            "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": vram},
            "cu_occupancy": "N/A"}


class StubAmdSmi:
    """The slice of `amdsmi` that keepgpu.telemetry.amd uses."""

    AmdSmiException = AmdSmiException
    AmdSmiLibraryException = AmdSmiLibraryException
    AmdSmiTemperatureType = AmdSmiTemperatureType
    AmdSmiTemperatureMetric = AmdSmiTemperatureMetric
    AmdSmiClkType = AmdSmiClkType

    def __init__(self, *gpus: StubAmdGpu, init_error: int | None = None,
                 absent: frozenset[str] = frozenset()) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.absent = absent
        self.inits = 0
        self.shutdowns = 0

    def __getattribute__(self, name: str) -> Any:
        if name in object.__getattribute__(self, "absent"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    def amdsmi_init(self) -> None:
        if self.init_error is not None:
            raise AmdSmiLibraryException(self.init_error)
        self.inits += 1

    def amdsmi_shut_down(self) -> None:
        self.shutdowns += 1

    @staticmethod
    def _dev(fn: str, gpu: StubAmdGpu) -> StubAmdGpu:
        code = gpu.fail.get(fn)
        if isinstance(code, list):
            code = code.pop(0) if code else None
        if code is not None:
            raise AmdSmiLibraryException(code)
        return gpu

    def amdsmi_get_processor_handles(self) -> list[StubAmdGpu]:
        return list(self.gpus)

    def amdsmi_get_gpu_device_uuid(self, h: StubAmdGpu) -> str:
        return self._dev("amdsmi_get_gpu_device_uuid", h).uuid

    def amdsmi_get_gpu_asic_info(self, h: StubAmdGpu) -> dict[str, Any]:
        gpu = self._dev("amdsmi_get_gpu_asic_info", h)
        return {"market_name": gpu.market_name, "asic_serial": gpu.serial}

    def amdsmi_get_gpu_activity(self, h: StubAmdGpu) -> dict[str, Any]:
        return {"gfx_activity": self._dev("amdsmi_get_gpu_activity", h).gfx,
                "umc_activity": "N/A", "mm_activity": "N/A"}

    def amdsmi_get_gpu_vram_usage(self, h: StubAmdGpu) -> dict[str, int]:
        gpu = self._dev("amdsmi_get_gpu_vram_usage", h)
        return {"vram_total": gpu.vram_total_mib, "vram_used": gpu.vram_used_mib}

    def amdsmi_get_temp_metric(self, h: StubAmdGpu, sensor: int, metric: int) -> int:
        assert metric is AmdSmiTemperatureMetric.CURRENT
        gpu = self._dev("amdsmi_get_temp_metric", h)
        if sensor not in gpu.temps:
            raise AmdSmiLibraryException(NOT_SUPPORTED)
        return gpu.temps[sensor]

    def amdsmi_get_power_info(self, h: StubAmdGpu) -> dict[str, Any]:
        return dict(self._dev("amdsmi_get_power_info", h).power)

    def amdsmi_get_clock_info(self, h: StubAmdGpu, kind: int) -> dict[str, Any]:
        assert kind is AmdSmiClkType.GFX
        return {"clk": self._dev("amdsmi_get_clock_info", h).clock_mhz, "min_clk": 500}

    def amdsmi_get_gpu_process_list(self, h: StubAmdGpu) -> list[dict[str, Any]]:
        return [dict(p) for p in self._dev("amdsmi_get_gpu_process_list", h).procs]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(amd, "_init_count", 0)

    def _install(*gpus: StubAmdGpu, **kwargs: Any) -> StubAmdSmi:
        stub = StubAmdSmi(*gpus, **kwargs)
        monkeypatch.setattr(amd, "_amdsmi", stub)
        return stub

    return _install


def test_normal_gpu_fills_fields_and_derives_per_process_util(
    install: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Neither process has a KFD context (a graphics client): fdinfo's GFX time is its load.
    monkeypatch.setattr(amd_procs, "_KFD_PROC_DIR", str(tmp_path))
    gpu = StubAmdGpu(procs=[proc(ME, 10_000_000_000), proc(OTHER_PID, 0, vram=3 * 1024 * MiB)])
    install(gpu)
    clock = Clock()
    tel = amd.AmdTelemetry(UUID, clock=clock)
    first = tel.sample()
    assert (first.uuid, first.name) == (UUID, "AMD Instinct MI300X")
    assert first.util_pct == 40.0
    assert (first.mem_used_bytes, first.mem_total_bytes) == (4096 * MiB, 196_592 * MiB)
    assert first.temp_c == 50.0  # edge sensor
    assert first.power_w == 210.0  # current is N/A: the average
    assert first.sm_clock_mhz == 2100.0
    assert first.pstate is None
    assert first.own_util_pct is None  # no baseline for the engine-time delta yet
    assert first.error is None and first.lost is False
    # 2 s later this process used 0.5 s of GFX engine time, the other one 1.5 s.
    clock.now += 2.0
    gpu.procs = [proc(ME, 10_500_000_000), proc(OTHER_PID, 1_500_000_000, vram=3 * 1024 * MiB)]
    second = tel.sample()
    assert second.own_util_pct == pytest.approx(25.0)
    assert second.processes is not None
    by_pid = {p.pid: p for p in second.processes}
    assert by_pid[OTHER_PID].util_pct == pytest.approx(75.0)
    assert by_pid[OTHER_PID].used_bytes == 3 * 1024 * MiB and by_pid[OTHER_PID].uid is None
    if amd_procs.pids_are_ours():  # else (a container) no pid's owner is trusted
        assert by_pid[ME].uid == os.getuid()
    assert second.extra == {"own_pid_visible": True}
    tel.close()


def test_unknown_values_are_null(install: Any, caplog: pytest.LogCaptureFixture) -> None:
    gpu = StubAmdGpu(gfx="N/A", temps={1: 77},
                     fail={"amdsmi_get_clock_info": NOT_SUPPORTED})
    install(gpu, absent=frozenset({"amdsmi_get_power_info"}))
    tel = amd.AmdTelemetry(UUID)
    with caplog.at_level(logging.INFO, logger=amd.__name__):
        s, again = tel.sample(), tel.sample()
    assert s.util_pct is None  # "N/A" is unknown, not 0
    assert s.temp_c == 77.0  # no edge sensor (MI300): hotspot
    assert s.power_w is None and s.sm_clock_mhz is None
    assert s.error is None and again.error is None
    assert sum("amdsmi_get_power_info" in r.message for r in caplog.records) == 1


def test_power_fields_all_unknown_is_null(install: Any) -> None:
    install(StubAmdGpu(power={"current_socket_power": "N/A", "average_socket_power": 0xFFFF}))
    assert amd.AmdTelemetry(UUID).sample().power_w is None


def test_intermittent_error_is_null_plus_error_then_recovers(install: Any) -> None:
    install(StubAmdGpu(fail={"amdsmi_get_gpu_activity": [API_FAILED, None]}))
    tel = amd.AmdTelemetry(UUID)
    bad, good = tel.sample(), tel.sample()
    assert bad.util_pct is None
    assert bad.error is not None and "amdsmi_get_gpu_activity" in bad.error
    assert bad.mem_total_bytes == 196_592 * MiB
    assert good.util_pct == 40.0 and good.error is None


def test_open_by_rocr_unique_id(install: Any) -> None:
    install(StubAmdGpu(uuid="aaaa", serial="0xAB12"), StubAmdGpu())
    # ROCr prints the 64-bit unique id as 16 hex digits (the asic serial's number).
    assert amd.AmdTelemetry("GPU-000000000000ab12").sample().uuid == "GPU-000000000000ab12"
    assert amd.AmdTelemetry(UUID.upper()).sample().name == "AMD Instinct MI300X"


def test_unknown_uuid_is_unavailable_and_releases(install: Any) -> None:
    stub = install(StubAmdGpu())
    with pytest.raises(TelemetryUnavailable, match="no AMD GPU with UUID GPU-nope"):
        amd.AmdTelemetry("GPU-nope")
    assert (stub.inits, stub.shutdowns) == (1, 1)


def test_init_failure_is_unavailable(install: Any) -> None:
    install(StubAmdGpu(), init_error=27)
    with pytest.raises(TelemetryUnavailable, match="AMD SMI cannot initialise"):
        amd.AmdTelemetry(UUID)
    with pytest.raises(TelemetryUnavailable):
        list_devices("amd")


def test_reference_counted_init_and_list_devices(install: Any) -> None:
    stub = install(StubAmdGpu(), StubAmdGpu(uuid="", serial=""),
                   StubAmdGpu(uuid="second", market_name="N/A", vram_total_mib=65_520))
    a = open_telemetry("amdsmi", UUID)
    devices = list_devices("amd")
    assert [(d.index, d.uuid, d.name, d.mem_total_bytes) for d in devices] == [
        (0, UUID, "AMD Instinct MI300X", 196_592 * MiB),
        (2, "second", None, 65_520 * MiB),
    ]
    assert (stub.inits, stub.shutdowns) == (1, 0)
    a.close()
    a.close()
    assert stub.shutdowns == 1


# --- the guarded import ------------------------------------------------------------------------


def test_import_without_rocm_is_guarded_and_silent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What amdsmi 7.0.2 does without ROCm: print to stdout, then KeyError('libamd_smi.so').
    pkg = tmp_path / "amdsmi"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "print('/opt/rocm/lib/libamd_smi.so: cannot open shared object file')\n"
        "print('Unable to find libamd_smi.so library try installing amd-smi-lib')\n"
        "raise KeyError('libamd_smi.so')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    monkeypatch.setattr(amd, "_amdsmi", None)
    monkeypatch.setattr(amd, "_init_count", 0)
    with pytest.raises(TelemetryUnavailable, match="libamd_smi.so") as caught:
        amd.AmdTelemetry(UUID)
    assert "ROCm" in str(caught.value)
    with pytest.raises(TelemetryUnavailable):
        list_devices("amd")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert amd._amdsmi is None and amd._init_count == 0


@pytest.mark.skipif(importlib.util.find_spec("amdsmi") is not None,
                    reason="amdsmi is installed here")
def test_import_when_not_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(amd, "_amdsmi", None)
    monkeypatch.setattr(amd, "_init_count", 0)
    with pytest.raises(TelemetryUnavailable, match="not installed"):
        open_telemetry("amdsmi", UUID)
    assert capsys.readouterr().out == ""
