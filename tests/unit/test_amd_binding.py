"""The AMD SMI adapter against a fake `amdsmi` that mirrors the real package (tests/fakes).

The fake is installed as the `amdsmi` module, so keepgpu's own guarded import, version check,
funnel and UUID matching run as they do on a ROCm node.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from fakes.fake_amdsmi import (
    NA16,
    FakeAmdGpu,
    FakeAmdSmi,
    MiB,
    amdsmi_uuid,
    hip_torch_uuid,
    process,
)

from keepgpu.telemetry import amd, amd_procs
from keepgpu.telemetry.amd_ids import rocr_form, rocr_from_amdsmi, uuid_from_hip
from keepgpu.telemetry.base import TelemetryUnavailable
from keepgpu.telemetry.open import list_devices

ME = os.getpid()
OTHER = 4_200_001
GPU0 = FakeAmdGpu(unique_id=0x5FD5C8B4F0D0E9BF, hip_id=0)
GPU1 = FakeAmdGpu(unique_id=0xBB0AC32B1C2C644A, hip_id=1, market_name="AMD Instinct MI250X")


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Put a fake amdsmi where `import amdsmi` finds it; KFD lists no processes by default."""
    monkeypatch.setattr(amd, "_amdsmi", None)
    monkeypatch.setattr(amd, "_init_count", 0)
    kfd = tmp_path / "kfd-proc"
    kfd.mkdir()
    monkeypatch.setattr(amd_procs, "_KFD_PROC_DIR", str(kfd))

    def _install(*gpus: FakeAmdGpu, **kwargs: Any) -> FakeAmdSmi:
        fake = FakeAmdSmi(*gpus, **kwargs)
        monkeypatch.setitem(sys.modules, "amdsmi", fake)
        fake.kfd_dir = kfd  # type: ignore[attr-defined]
        return fake

    return _install


def copy(gpu: FakeAmdGpu, **changes: Any) -> FakeAmdGpu:
    fields = dict(vars(gpu))
    fields.update(changes)
    return FakeAmdGpu(**fields)


# --- item 1: the three UUID spellings --------------------------------------------------------


def test_uuid_from_hip_decodes_what_torch_prints_on_rocm() -> None:
    # The example: ROCr "GPU-bb0ac32b1c2c644a" reaches Python as hex of its text.
    assert uuid_from_hip("62623061-6333-3262-3163-326336343461") == "GPU-bb0ac32b1c2c644a"
    assert uuid_from_hip("62623061633332623163326336343461".upper()) == "GPU-bb0ac32b1c2c644a"
    assert uuid_from_hip(hip_torch_uuid(GPU0.unique_id)) == GPU0.rocr_id
    assert uuid_from_hip("GPU-" + hip_torch_uuid(GPU0.unique_id)) == GPU0.rocr_id
    # A real binary UUID (NVIDIA), ROCr's "GPU-XX" (no unique id), junk: not the ROCm form.
    assert uuid_from_hip("8932f937-d72c-4106-c12f-20bd9faed9f6") is None
    assert uuid_from_hip(b"XX".hex() + "00" * 14) is None
    assert uuid_from_hip("GPU-bb0ac32b1c2c644a") is None
    assert uuid_from_hip("") is None


def test_amdsmi_uuid_carries_rocr_unique_id() -> None:
    # amd_smi_uuid.cc's layout, as amd-smi prints it for an MI300X.
    assert GPU0.uuid == "5fff74a1-0000-1000-80d5-c8b4f0d0e9bf"
    assert rocr_from_amdsmi(GPU0.uuid) == "GPU-5fd5c8b4f0d0e9bf"
    assert rocr_from_amdsmi(amdsmi_uuid(0xBB0AC32B1C2C644A, 0x740C, fcn=3)) == GPU1.rocr_id
    assert rocr_from_amdsmi(amdsmi_uuid(0, 0x740C)) is None  # no unique id: pins nothing
    assert rocr_form("0x5FD5C8B4F0D0E9BF") == rocr_form("GPU-5FD5C8B4F0D0E9BF") == GPU0.rocr_id
    # torch's hex of text is never mistaken for an amdsmi UUID (version nibble is not 1).
    assert rocr_from_amdsmi(hip_torch_uuid(GPU1.unique_id)) is None


def test_open_by_every_spelling_finds_the_same_gpu(install: Any) -> None:
    install(copy(GPU0), copy(GPU1))
    for spelling in (GPU1.uuid, GPU1.uuid.upper(), GPU1.rocr_id, hip_torch_uuid(GPU1.unique_id)):
        tel = amd.AmdTelemetry(spelling)
        try:
            assert tel.sample().name == "AMD Instinct MI250X", spelling
        finally:
            tel.close()


def test_partitions_share_rocr_id_so_only_the_amdsmi_uuid_picks_one(install: Any) -> None:
    parts = [copy(GPU0, fcn=i, hip_id=i, gfx=10 * (i + 1)) for i in range(2)]
    install(*parts)
    with pytest.raises(TelemetryUnavailable, match="names 2 AMD SMI devices"):
        amd.AmdTelemetry(GPU0.rocr_id)
    with amd.AmdTelemetry(parts[1].uuid) as tel:
        assert tel.sample().util_pct == 20.0


def test_list_devices_in_rocr_order_with_rocr_ids(install: Any) -> None:
    # AMD SMI lists by PCI order; ROCr/HIP (KFD node order) numbers them the other way round.
    install(copy(GPU0, hip_id=1), copy(GPU1, hip_id=0, vram_total_bytes=65_536 * MiB + 5))
    devices = list_devices("amd")
    assert [(d.index, d.uuid, d.runtime_id) for d in devices] == [
        (0, GPU1.uuid, GPU1.rocr_id), (1, GPU0.uuid, GPU0.rocr_id)]
    assert devices[0].mem_total_bytes == 65_536 * MiB + 5  # bytes, not MiB rounded


def test_list_devices_without_enumeration_info_keeps_amdsmi_order(install: Any) -> None:
    install(copy(GPU0), copy(GPU1), absent=frozenset({"amdsmi_get_gpu_enumeration_info"}))
    devices = list_devices("amd")
    assert [(d.index, d.runtime_id) for d in devices] == [(0, GPU0.rocr_id), (1, GPU1.rocr_id)]


# --- item 2: KFD processes' GFX time is blind ------------------------------------------------


def test_kfd_process_utilization_is_unknown_not_zero(install: Any) -> None:
    gpu = copy(GPU0, procs=[process(ME, 0), process(OTHER, 0)])
    fake = install(gpu)
    for pid in (ME, OTHER):
        (fake.kfd_dir / str(pid)).mkdir()
    clock = iter([100.0, 102.0]).__next__
    with amd.AmdTelemetry(GPU0.uuid, clock=clock) as tel:
        tel.sample()
        # Two busy HIP processes: fdinfo never sees their user-queue work, GFX time stays 0.
        gpu.procs = [process(ME, 0), process(OTHER, 0)]
        second = tel.sample()
    assert second.processes is not None
    assert [p.util_pct for p in second.processes] == [None, None]
    assert second.own_util_pct is None  # the worker falls back to its quiet probe
    assert second.util_pct == 40.0  # the device-wide reading is still there


def test_unreadable_kfd_list_makes_every_process_unknown(
    install: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpu = copy(GPU0, procs=[process(OTHER, 0)])
    install(gpu)
    monkeypatch.setattr(amd_procs, "_KFD_PROC_DIR", str(tmp_path / "absent"))
    clock = iter([100.0, 102.0]).__next__
    with amd.AmdTelemetry(GPU0.uuid, clock=clock) as tel:
        tel.sample()
        gpu.procs = [process(OTHER, 1_000_000_000)]
        assert [p.util_pct for p in tel.sample().processes or ()] == [None]


def test_graphics_client_outside_kfd_keeps_its_engine_time_util(install: Any) -> None:
    gpu = copy(GPU0, procs=[process(OTHER, 0)])
    install(gpu)
    clock = iter([100.0, 102.0]).__next__
    with amd.AmdTelemetry(GPU0.uuid, clock=clock) as tel:
        tel.sample()
        gpu.procs = [process(OTHER, 1_000_000_000)]
        (only,) = tel.sample().processes or ()
    assert only.util_pct == pytest.approx(50.0)


# --- item 4: memory ----------------------------------------------------------------------


def test_vram_in_exact_bytes(install: Any) -> None:
    install(copy(GPU0, vram_used_bytes=4096 * MiB + MiB - 1))
    with amd.AmdTelemetry(GPU0.uuid) as tel:
        s = tel.sample()
    assert s.mem_used_bytes == 4096 * MiB + MiB - 1  # vram_usage would say 4096 MiB
    assert s.mem_free_bytes == 196_592 * MiB - (4097 * MiB - 1)


def test_vram_falls_back_to_mib_when_byte_calls_are_missing(install: Any) -> None:
    install(copy(GPU0), absent=frozenset({"amdsmi_get_gpu_memory_total",
                                          "amdsmi_get_gpu_memory_usage"}))
    with amd.AmdTelemetry(GPU0.uuid) as tel:
        s = tel.sample()
    assert (s.mem_used_bytes, s.mem_total_bytes) == (4096 * MiB, 196_592 * MiB)
    assert s.error is None


def test_power_na_and_sensors(install: Any) -> None:
    install(copy(GPU0, temps={1: 77}, power_w={"current_socket_power": NA16,
                                              "average_socket_power": NA16,
                                              "socket_power": NA16}))
    with amd.AmdTelemetry(GPU0.uuid) as tel:
        s = tel.sample()
    assert (s.temp_c, s.power_w, s.sm_clock_mhz) == (77.0, None, 2100.0)


# --- item 10: wrapper / library version skew ---------------------------------------------


def test_wrapper_7_over_rocm_6_is_refused_before_init(install: Any) -> None:
    fake = install(copy(GPU0), version="7.0.2", rocm=(True, "6.4.3"), lib_major=25)
    with pytest.raises(TelemetryUnavailable) as caught:
        amd.AmdTelemetry(GPU0.uuid)
    message = str(caught.value)
    assert "amdsmi 7.0.2 does not match ROCm 6.4.3" in message
    assert "amdsmi==6.4.3" in message and "\n" not in message
    assert fake.inits == 0 and amd._init_count == 0
    with pytest.raises(TelemetryUnavailable, match="does not match"):
        list_devices("amd")


def test_rocm_unknown_then_library_number_decides(install: Any) -> None:
    fake = install(copy(GPU0), version="7.0.2", rocm=(False, "Could not find librocm-core.so"),
                   lib_major=25)
    with pytest.raises(TelemetryUnavailable, match="library 25.x"):
        amd.AmdTelemetry(GPU0.uuid)
    fake.lib_major = 26
    with amd.AmdTelemetry(GPU0.uuid) as tel:
        assert tel.sample().util_pct == 40.0


def test_matching_versions_open(install: Any) -> None:
    install(copy(GPU0), version="6.4.3", rocm=(True, "6.4.1"), lib_major=5)
    with amd.AmdTelemetry(GPU0.uuid) as tel:
        assert tel.sample().mem_total_bytes == 196_592 * MiB


# --- item 12: owners of pids in a container ----------------------------------------------


def test_pid_owner_not_trusted_outside_the_initial_pid_namespace(
    install: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # AMD SMI reports host pids; in a container the same number can be another local process.
    install(copy(GPU0, procs=[process(ME, 0)]))
    other_ns = tmp_path / "pid-ns"
    other_ns.write_text("")
    monkeypatch.setattr(amd_procs, "_PID_NS_PATH", str(other_ns))
    with amd.AmdTelemetry(GPU0.uuid) as tel:
        (mine,) = tel.sample().processes or ()
    assert mine.pid == ME and mine.uid is None


@pytest.mark.skipif(not amd_procs.pids_are_ours(), reason="runs in a container")
def test_pid_owner_resolved_in_the_initial_pid_namespace(install: Any) -> None:
    install(copy(GPU0, procs=[process(ME, 0)]))
    with amd.AmdTelemetry(GPU0.uuid) as tel:
        (mine,) = tel.sample().processes or ()
    assert mine.uid == os.getuid()
