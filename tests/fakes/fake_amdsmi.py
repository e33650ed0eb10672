"""A fake `amdsmi` Python package, written from amdsmi 6.4.3 / 7.0.2 (amdsmi_interface.py,
amdsmi_exception.py, amdsmi_wrapper.py) and the C library's amd_smi_uuid.cc.

What it reproduces, because keepgpu's adapter depends on it:
- calls before `amdsmi_init` raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_INIT = 32);
  a handle that is not a processor handle raises AmdSmiParameterException;
- AmdSmiLibraryException(err_code) with `get_error_code()` and `err_info`
  ("AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported");
- units: vram_usage in MiB rounded down; memory_total/usage in bytes; power in W with 0xFFFF
  shown as "N/A"; temperatures in degrees C; process engine time in ns, memory in bytes;
- `amdsmi_get_gpu_device_uuid` laid out as amd_smi_uuid.cc does (unique id bytes, PCI device
  id, fcn/partition byte); asic_serial "0x%016X"; enumeration info hip_uuid "GPU-%016x";
- versions: `__version__` (the wrapper, = ROCm's), `amdsmi_get_rocm_version()` -> (ok, text),
  `amdsmi_get_lib_version()` -> dict, as a 7.x wrapper reads it (a ROCm 6 library's year field
  lands in "major").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

STATUS_NAMES = {
    2: "AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported",
    3: "AMDSMI_STATUS_NOT_YET_IMPLEMENTED - Feature not yet implemented",
    7: "AMDSMI_STATUS_API_FAILED - API call failed",
    10: "AMDSMI_STATUS_NO_PERM - Permission Denied",
    31: "AMDSMI_STATUS_NOT_FOUND - Device Not found",
    32: "AMDSMI_STATUS_NOT_INIT - Device not initialized",
    40: "AMDSMI_STATUS_NO_DATA - No data was found for a given input",
}
NOT_SUPPORTED, API_FAILED, NOT_INIT = 2, 7, 32
MiB = 1024 * 1024
NA16 = 0xFFFF


class AmdSmiException(Exception):
    pass


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code: int) -> None:
        err_code = abs(err_code)
        super().__init__(err_code)
        self.err_code = err_code
        self.err_info = STATUS_NAMES.get(err_code, "AMDSMI_STATUS_UNKNOWN_ERROR - Unknown error")

    def __str__(self) -> str:
        return f"Error code:\n\t{self.err_code} | {self.err_info}"

    def get_error_code(self) -> int:
        return self.err_code


class AmdSmiParameterException(AmdSmiException):
    def __init__(self, received: object, expected: object) -> None:
        super().__init__(f"Invalid parameter: expected {expected}, got {type(received)}")


class AmdSmiTemperatureType(enum.IntEnum):
    EDGE = 0
    HOTSPOT = 1
    JUNCTION = 1
    VRAM = 2


class AmdSmiTemperatureMetric(enum.IntEnum):
    CURRENT = 0


class AmdSmiClkType(enum.IntEnum):
    SYS = 0
    GFX = 0
    MEM = 4


class AmdSmiMemoryType(enum.IntEnum):
    VRAM = 0
    VIS_VRAM = 1
    GTT = 2


def amdsmi_uuid(unique_id: int, device_id: int, fcn: int = 0xFF) -> str:
    """amdsmi_uuid_gen (amd_smi_uuid.cc): the unique id's bytes around device id and fcn."""
    time_low = ((unique_id >> 56) & 0xFF) << 24 | (fcn & 0xFF) << 16 | (device_id & 0xFFFF)
    byte6 = (unique_id >> 48) & 0xFF
    return (f"{time_low:08x}-0000-1000-{0x80:02x}{byte6:02x}-"
            f"{(unique_id >> 32) & 0xFFFF:04x}{unique_id & 0xFFFFFFFF:08x}")


def hip_torch_uuid(unique_id: int) -> str:
    """What torch prints on ROCm: hex of the 16 ASCII characters after ROCr's "GPU-"."""
    raw = f"{unique_id:016x}".encode().hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


@dataclass
class FakeAmdGpu:
    """One GPU (or partition). `fail[fn]` = status that function raises (a list: one per call)."""

    unique_id: int = 0x5FD5C8B4F0D0E9BF
    device_id: int = 0x74A1  # MI300X
    fcn: int = 0xFF  # newer amdsmi puts the partition index here
    hip_id: Any = 0
    market_name: str = "AMD Instinct MI300X"
    gfx: int = 40
    vram_total_bytes: int = 196_592 * MiB
    vram_used_bytes: int = 4096 * MiB
    temps: dict[int, int] = field(default_factory=lambda: {0: 50, 1: 70})
    power_w: dict[str, int] = field(default_factory=lambda: {
        "socket_power": 210, "current_socket_power": NA16, "average_socket_power": 210})
    clock_mhz: int = 2100
    procs: list[dict[str, Any]] = field(default_factory=list)
    fail: dict[str, Any] = field(default_factory=dict)

    @property
    def uuid(self) -> str:
        return amdsmi_uuid(self.unique_id, self.device_id, self.fcn)

    @property
    def rocr_id(self) -> str:
        return f"GPU-{self.unique_id:016x}"


def process(pid: int, gfx_ns: int, vram: int = 1024 * MiB, name: str = "python") -> dict[str, Any]:
    """One entry of amdsmi_get_gpu_process_list (amdsmi >= 6.1 returns dicts)."""
    return {"name": name, "pid": pid, "mem": vram,
            "engine_usage": {"gfx": gfx_ns, "enc": 0},
            "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": vram},
            "cu_occupancy": "N/A"}


class ProcessorHandle:
    """Stands for amdsmi_wrapper.amdsmi_processor_handle (an opaque ctypes pointer)."""

    def __init__(self, gpu: FakeAmdGpu) -> None:
        self.gpu = gpu


class FakeAmdSmi:
    """The `amdsmi` module for one scenario. `absent` names functions this version lacks."""

    AmdSmiException = AmdSmiException
    AmdSmiLibraryException = AmdSmiLibraryException
    AmdSmiParameterException = AmdSmiParameterException
    AmdSmiTemperatureType = AmdSmiTemperatureType
    AmdSmiTemperatureMetric = AmdSmiTemperatureMetric
    AmdSmiClkType = AmdSmiClkType
    AmdSmiMemoryType = AmdSmiMemoryType

    def __init__(self, *gpus: FakeAmdGpu, version: str = "7.0.2",
                 rocm: tuple[bool, str] | None = None, lib_major: int = 26,
                 absent: frozenset[str] = frozenset()) -> None:
        self.gpus = list(gpus)
        self.__version__ = version
        self.rocm = (True, version) if rocm is None else rocm
        self.lib_major = lib_major
        self.absent = absent
        self.inits = self.shutdowns = 0
        self.initialised = False

    def __getattribute__(self, name: str) -> Any:
        if name in object.__getattribute__(self, "absent"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    # -- library --------------------------------------------------------------------------
    def amdsmi_init(self, flags: int = 0) -> None:
        self.inits += 1
        self.initialised = True

    def amdsmi_shut_down(self) -> None:
        self.shutdowns += 1
        self.initialised = False

    def amdsmi_get_rocm_version(self) -> tuple[bool, str]:
        return self.rocm  # reads librocm-core.so: no init needed

    def amdsmi_get_lib_version(self) -> dict[str, Any]:
        return {"major": self.lib_major, "minor": 0, "release": 0, "build": ""}

    def amdsmi_get_processor_handles(self) -> list[ProcessorHandle]:
        self._need_init()
        return [ProcessorHandle(g) for g in self.gpus]

    def _need_init(self) -> None:
        if not self.initialised:
            raise AmdSmiLibraryException(NOT_INIT)

    def _gpu(self, fn: str, handle: object) -> FakeAmdGpu:
        if not isinstance(handle, ProcessorHandle):
            raise AmdSmiParameterException(handle, ProcessorHandle)
        self._need_init()
        code = handle.gpu.fail.get(fn)
        if isinstance(code, list):
            code = code.pop(0) if code else None
        if code is not None:
            raise AmdSmiLibraryException(code)
        return handle.gpu

    # -- identity -------------------------------------------------------------------------
    def amdsmi_get_gpu_device_uuid(self, h: object) -> str:
        return self._gpu("amdsmi_get_gpu_device_uuid", h).uuid

    def amdsmi_get_gpu_asic_info(self, h: object) -> dict[str, Any]:
        g = self._gpu("amdsmi_get_gpu_asic_info", h)
        return {"market_name": g.market_name or "N/A", "vendor_id": "0x1002",
                "vendor_name": "Advanced Micro Devices Inc. [AMD/ATI]", "subvendor_id": "0x1002",
                "device_id": hex(g.device_id), "rev_id": "0x00",
                "asic_serial": f"0x{g.unique_id:016X}", "oam_id": 0, "num_compute_units": 304,
                "target_graphics_version": "gfx942", "subsystem_id": "0x74a1"}

    def amdsmi_get_gpu_enumeration_info(self, h: object) -> dict[str, Any]:
        g = self._gpu("amdsmi_get_gpu_enumeration_info", h)
        hip = g.hip_id if isinstance(g.hip_id, int) else 0
        return {"drm_render": 128 + hip, "drm_card": hip, "hsa_id": hip + 1, "hip_id": g.hip_id,
                "hip_uuid": g.rocr_id}

    # -- readings -------------------------------------------------------------------------
    def amdsmi_get_gpu_activity(self, h: object) -> dict[str, Any]:
        g = self._gpu("amdsmi_get_gpu_activity", h)
        return {"gfx_activity": "N/A" if g.gfx == NA16 else g.gfx,
                "umc_activity": "N/A", "mm_activity": "N/A"}

    def amdsmi_get_gpu_vram_usage(self, h: object) -> dict[str, int]:
        g = self._gpu("amdsmi_get_gpu_vram_usage", h)
        return {"vram_total": g.vram_total_bytes // MiB, "vram_used": g.vram_used_bytes // MiB}

    def amdsmi_get_gpu_memory_total(self, h: object, mem_type: AmdSmiMemoryType) -> int:
        if not isinstance(mem_type, AmdSmiMemoryType):
            raise AmdSmiParameterException(mem_type, AmdSmiMemoryType)
        return self._gpu("amdsmi_get_gpu_memory_total", h).vram_total_bytes

    def amdsmi_get_gpu_memory_usage(self, h: object, mem_type: AmdSmiMemoryType) -> int:
        if not isinstance(mem_type, AmdSmiMemoryType):
            raise AmdSmiParameterException(mem_type, AmdSmiMemoryType)
        return self._gpu("amdsmi_get_gpu_memory_usage", h).vram_used_bytes

    def amdsmi_get_temp_metric(self, h: object, sensor: AmdSmiTemperatureType,
                               metric: AmdSmiTemperatureMetric) -> int:
        if not isinstance(sensor, AmdSmiTemperatureType):
            raise AmdSmiParameterException(sensor, AmdSmiTemperatureType)
        g = self._gpu("amdsmi_get_temp_metric", h)
        if sensor not in g.temps:
            raise AmdSmiLibraryException(NOT_SUPPORTED)
        return g.temps[sensor]

    def amdsmi_get_power_info(self, h: object) -> dict[str, Any]:
        g = self._gpu("amdsmi_get_power_info", h)
        info = {"gfx_voltage": NA16, "soc_voltage": NA16, "mem_voltage": NA16,
                "power_limit": 750, **g.power_w}
        return {k: "N/A" if v == NA16 else v for k, v in info.items()}

    def amdsmi_get_clock_info(self, h: object, kind: AmdSmiClkType) -> dict[str, Any]:
        if not isinstance(kind, AmdSmiClkType):
            raise AmdSmiParameterException(kind, AmdSmiClkType)
        g = self._gpu("amdsmi_get_clock_info", h)
        return {"clk": g.clock_mhz, "min_clk": 500, "max_clk": 2100, "clk_locked": False,
                "clk_deep_sleep": False}

    def amdsmi_get_gpu_process_list(self, h: object) -> list[dict[str, Any]]:
        return [dict(p) for p in self._gpu("amdsmi_get_gpu_process_list", h).procs]
