"""AMD device selection: the visible list is what ROCr and HIP both allow, pinned by ROCr id."""

from __future__ import annotations

import pytest

from keepgpu.supervisor.devices import ConfigError, select, visible_devices
from keepgpu.supervisor.procs import worker_env
from keepgpu.telemetry.base import DeviceInfo, TelemetryUnavailable


def rocr(i: int) -> str:
    return f"GPU-{0xA0 + i:016x}"


def smi(i: int) -> str:
    return f"{i:08x}-0000-1000-8000-0000000000a{i}"


FOUR = [DeviceInfo(i, smi(i), "MI300X", runtime_id=rocr(i)) for i in range(4)]


def four(vendor: str) -> list[DeviceInfo]:
    if vendor != "amd":
        raise TelemetryUnavailable("no NVML here")
    return list(FOUR)


def nothing(vendor: str) -> list[DeviceInfo]:
    raise TelemetryUnavailable(f"{vendor} library missing")


def rows(env: dict[str, str], lister=four) -> list[tuple[str, str | None]]:
    vis = visible_devices("rocm", env=env, lister=lister)
    assert vis.vendor == "amd"
    return list(zip(vis.entries, vis.uuids, strict=True))


def test_no_lists_pins_every_gpu_by_rocr_id() -> None:
    assert rows({}) == [(rocr(i), smi(i)) for i in range(4)]
    assert visible_devices("auto", env={}, lister=four).engine == "rocm"


def test_hip_visible_devices_narrows_what_the_keeper_may_hold() -> None:
    # Before: HIP_VISIBLE_DEVICES was ignored and all four GPUs were held.
    assert rows({"HIP_VISIBLE_DEVICES": "1"}) == [(rocr(1), smi(1))]
    assert rows({"CUDA_VISIBLE_DEVICES": "3,0"}) == [(rocr(3), smi(3)), (rocr(0), smi(0))]
    # HIP_VISIBLE_DEVICES wins over CUDA_VISIBLE_DEVICES, as in HIP.
    assert rows({"HIP_VISIBLE_DEVICES": "2", "CUDA_VISIBLE_DEVICES": "0"}) == [(rocr(2), smi(2))]


def test_hip_indices_count_the_list_left_after_rocr() -> None:
    env = {"ROCR_VISIBLE_DEVICES": "2,3", "HIP_VISIBLE_DEVICES": "1"}
    assert rows(env) == [(rocr(3), smi(3))]
    auto = visible_devices("auto", env=env, lister=four)
    assert select("all", auto)[0].entry == rocr(3)


def test_rocr_and_hip_accept_uuids_and_stop_at_a_bad_entry() -> None:
    assert rows({"ROCR_VISIBLE_DEVICES": f"{rocr(2)},1"}) == [(rocr(2), smi(2)), (rocr(1), smi(1))]
    assert rows({"HIP_VISIBLE_DEVICES": smi(3)}) == [(rocr(3), smi(3))]
    assert rows({"ROCR_VISIBLE_DEVICES": "0,9,1"}) == [(rocr(0), smi(0))]
    assert rows({"ROCR_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "1"}) == []
    with pytest.raises(ConfigError, match="no GPU is visible"):
        select("all", visible_devices("rocm", env={"HIP_VISIBLE_DEVICES": ""}, lister=four))


def test_partitions_sharing_a_rocr_id_are_pinned_by_ordinal() -> None:
    parts = [DeviceInfo(i, smi(i), runtime_id=rocr(0)) for i in range(2)]
    assert rows({}, lister=lambda v: parts) == [("0", smi(0)), ("1", smi(1))]
    assert rows({"HIP_VISIBLE_DEVICES": "1"}, lister=lambda v: parts) == [("1", smi(1))]


def test_without_amd_smi_the_lists_still_intersect() -> None:
    env = {"ROCR_VISIBLE_DEVICES": "2,3", "HIP_VISIBLE_DEVICES": "1"}
    assert rows(env, lister=nothing) == [("3", None)]
    assert rows({"ROCR_VISIBLE_DEVICES": f"{rocr(1)}"}, lister=nothing) == [(rocr(1), rocr(1))]
    with pytest.raises(ConfigError, match="ROCR_VISIBLE_DEVICES is unset"):
        visible_devices("rocm", env={}, lister=nothing)


def test_gpus_selects_by_either_uuid_spelling() -> None:
    vis = visible_devices("rocm", env={}, lister=four)
    assert [d.gpu for d in select(f"{smi(2)},{rocr(1)}", vis)] == [2, 1]


def test_worker_sees_exactly_its_entry() -> None:
    base = {"ROCR_VISIBLE_DEVICES": "2,3", "HIP_VISIBLE_DEVICES": "1",
            "CUDA_VISIBLE_DEVICES": "1", "GPU_DEVICE_ORDINAL": "1", "CUDA_DEVICE_ORDER": "X"}
    (device,) = select("all", visible_devices("rocm", env=base, lister=four))
    env = worker_env(base, "amd", device.entry)
    assert env["ROCR_VISIBLE_DEVICES"] == rocr(3)
    assert not {"HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL"} & set(env)
    assert env["CUDA_DEVICE_ORDER"] == "X"
