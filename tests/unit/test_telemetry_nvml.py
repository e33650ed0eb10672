"""NVML adapter against a fake pynvml (tests/fakes/fake_pynvml.py): real structs, real
NVMLError subclasses, per-pid timestamps, MIG, as nvidia-ml-py and NVML's docs show them."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from typing import Any

import pynvml
import pytest
from fakes.fake_pynvml import FakeGpu, FakeNvml
from fakes.fake_pynvml import install as install_fake

from keepgpu.telemetry import nvml, nvml_list
from keepgpu.telemetry.base import TelemetryUnavailable
from keepgpu.telemetry.null import NullTelemetry
from keepgpu.telemetry.open import list_devices, open_telemetry
from keepgpu.worker.policy import PressureRule, attributed_others

GiB = 1024**3
MiB = 1024**2
NOW_US = 1_700_000_000_000_000
SECOND_US = 1_000_000
OTHER_PID = 4_200_001  # above PID_MAX_LIMIT: never a real process
ME = os.getpid()

NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
NO_FUNCTION = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND

UUID = "GPU-11111111-2222-3333-4444-555555555555"


def with_me(uuid: str, **kw: Any) -> FakeGpu:
    """A GPU with this process on it (2 GiB)."""
    kw.setdefault("procs", [(ME, 2 * GiB)])
    return FakeGpu(uuid, **kw)


class Clock:
    """The wall clock nvml.py reads for per-process sample horizons (µs), moved by hand."""

    def __init__(self) -> None:
        self.us = NOW_US

    def __call__(self) -> int:
        return self.us


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(nvml, "_now_us", c)
    return c


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> Any:
    """Put a fake binding in place of pynvml for nvml.py (fresh init count, fixed wall clock)."""

    def _install(*gpus: FakeGpu, **kwargs: Any) -> FakeNvml:
        return install_fake(monkeypatch, *gpus, **kwargs)

    return _install


# --- scenario: a normal GPU -------------------------------------------------------------------


def test_normal_gpu_fills_every_field(install: Any) -> None:
    gpu = with_me(UUID, procs=[(ME, 2 * GiB), (OTHER_PID, 3 * GiB)],
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
    gpu = with_me(UUID, procs=[(11, 1), (12, 1), (OTHER_PID, 1)],
                  samples=[(11, NOW_US - 900, 90), (11, NOW_US - 100, 10), (12, NOW_US - 50, 15),
                           (OTHER_PID, NOW_US - 10, 50)])
    install(gpu)
    tel = nvml.NvmlTelemetry(UUID)
    s = tel.sample(own_pids=[11, 12])
    assert s.own_util_pct == 25.0
    assert s.extra["own_pid_visible"] is True


def test_not_found_means_zero_and_old_samples_do_not_count(install: Any, clock: Clock) -> None:
    gpu = with_me(UUID, samples=[(ME, NOW_US - 300, 30), (ME, NOW_US - 200, 35)])
    fake = install(gpu)
    tel = nvml.NvmlTelemetry(UUID)
    assert tel.sample().own_util_pct == 35.0  # the newest sample of the pid
    clock.us += 6 * SECOND_US  # past the hold: nothing newer -> NVML answers NotFound
    s = tel.sample()
    since = [args[0] for name, args in fake.calls if name == "nvmlDeviceGetProcessUtilization"]
    assert since == [NOW_US - nvml._PROCESS_HOLD_US, clock.us - nvml._PROCESS_HOLD_US]
    assert s.own_util_pct == 0.0
    assert s.processes is not None and s.processes[0].util_pct == 0.0
    assert s.error is None


# --- item 8: per-process samples are stamped per pid -------------------------------------------


def test_other_pids_load_is_seen_on_every_tick_despite_per_pid_timestamps(
    install: Any, clock: Clock
) -> None:
    """NVML stamps each pid on its own schedule. Before: one shared "last seen" (the newest
    timestamp of any pid) was passed on, so pid B, stamped earlier than A, read 0 on the next
    tick and its late-stamped sample was never returned."""
    a, b = OTHER_PID, OTHER_PID + 1
    gpu = with_me(UUID, procs=[(ME, GiB), (a, GiB), (b, GiB)],
                  samples=[(a, NOW_US - 100_000, 10), (b, NOW_US - 300_000, 60)])
    install(gpu)
    tel = nvml.NvmlTelemetry(UUID)
    first = tel.sample()
    clock.us += 500_000
    # A gets its next sample; B's next one is stamped before A's previous one.
    gpu.samples += [(a, clock.us - 100_000, 10), (b, NOW_US - 200_000, 70)]
    second = tel.sample()
    clock.us += 500_000
    gpu.samples.append((a, clock.us - 100_000, 10))  # nothing new from B this tick
    third = tel.sample()
    loads = [{p.pid: p.util_pct for p in s.processes or ()} for s in (first, second, third)]
    assert loads == [{ME: 0.0, a: 10.0, b: 60.0}, {ME: 0.0, a: 10.0, b: 70.0},
                     {ME: 0.0, a: 10.0, b: 70.0}]
    assert [attributed_others(s, {ME}) for s in (first, second, third)] == [70.0, 80.0, 80.0]


def test_a_pid_without_samples_for_the_hold_time_reads_idle(install: Any, clock: Clock) -> None:
    gpu = with_me(UUID, procs=[(ME, GiB), (OTHER_PID, GiB)],
                  samples=[(OTHER_PID, NOW_US - 10, 90)])
    install(gpu)
    tel = nvml.NvmlTelemetry(UUID)
    assert tel.sample().processes[1].util_pct == 90.0  # type: ignore[index]
    clock.us += nvml._PROCESS_HOLD_US - 1000
    assert tel.sample().processes[1].util_pct == 90.0  # type: ignore[index]
    clock.us += 2000
    assert tel.sample().processes[1].util_pct == 0.0  # type: ignore[index]
    assert tel._seen == {}  # forgotten, not kept forever


def test_per_process_unsupported_gives_none_not_zero(install: Any) -> None:
    install(with_me(UUID, fail={"nvmlDeviceGetProcessUtilization": NOT_SUPPORTED}))
    s = nvml.NvmlTelemetry(UUID).sample()
    assert s.own_util_pct is None
    assert s.processes is not None and s.processes[0].util_pct is None
    assert s.util_pct == 30.0 and s.error is None


def test_success_with_no_entries_means_nothing_ran(install: Any) -> None:
    # pynvml raises NVMLError(NVML_SUCCESS) when the sized query finds zero samples.
    install(with_me(UUID, empty_samples_ret=pynvml.NVML_SUCCESS))
    s = nvml.NvmlTelemetry(UUID).sample()
    assert s.own_util_pct == 0.0 and s.error is None


# --- scenario: a GPU without power and temperature readings ------------------------------------


def test_power_and_temperature_not_supported_are_null(install: Any) -> None:
    install(with_me(UUID, fail={"nvmlDeviceGetPowerUsage": NOT_SUPPORTED,
                                "nvmlDeviceGetTemperatureV": NOT_SUPPORTED}))
    s = nvml.NvmlTelemetry(UUID).sample()
    assert s.power_w is None and s.temp_c is None
    assert s.util_pct == 30.0 and s.mem_used_bytes == 10 * GiB
    assert s.error is None  # "not supported" is not an error


def test_missing_function_falls_back_and_is_logged_once(
    install: Any, caplog: pytest.LogCaptureFixture
) -> None:
    stub = install(with_me(UUID, fail={"nvmlDeviceGetTemperatureV": NO_FUNCTION,
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
    install(with_me(UUID), absent=frozenset({"nvmlDeviceGetClockInfo", "nvmlMemory_v2"}))
    s = nvml.NvmlTelemetry(UUID).sample()
    assert s.sm_clock_mhz is None and s.error is None
    assert s.util_pct == 30.0
    assert s.mem_total_bytes == 80 * GiB  # v1 memory query when the binding has no v2


def test_unknown_pstate_is_null(install: Any) -> None:
    install(with_me(UUID, pstate=pynvml.NVML_PSTATE_UNKNOWN))
    assert nvml.NvmlTelemetry(UUID).sample().pstate is None


# --- scenario: GPU lost mid-run ----------------------------------------------------------------


def test_gpu_lost_mid_run(install: Any) -> None:
    gpu = with_me(UUID)
    install(gpu)
    tel = nvml.NvmlTelemetry(UUID)
    assert tel.sample().lost is False
    gpu.lost = True
    s = tel.sample()
    assert s.lost is True and s.error == "gpu lost" and s.uuid == UUID
    assert s.util_pct is None and s.mem_used_bytes is None and s.processes is None
    assert tel.slowdown_temp_c() is None


def test_gpu_lost_at_open_is_unavailable(install: Any) -> None:
    stub = install(with_me(UUID, lost=True))
    with pytest.raises(TelemetryUnavailable, match="lost"):
        nvml.NvmlTelemetry(UUID)
    assert stub.inits == stub.shutdowns == 1


# --- scenario: a MIG instance ------------------------------------------------------------------


def mig_gpu() -> tuple[FakeGpu, FakeGpu, FakeGpu]:
    """A MIG-enabled H100 with two instances in slots 0 and 2 (slot 1 empty)."""
    parent = FakeGpu("GPU-parent", temp=61, power_mw=300_000, sm_clock_mhz=1755,
                     procs=[(OTHER_PID, 5 * GiB)])
    small = parent.add_mig("MIG-aaaa", mem_total=10 * GiB, mem_used=2 * GiB,
                           procs=[(ME, 2 * GiB)], samples=[(ME, NOW_US - 1, 50)])
    parent.mig_slots.append(None)
    big = parent.add_mig("MIG-bbbb", mem_total=40 * GiB, mem_used=5 * GiB,
                         procs=[(OTHER_PID, 5 * GiB)])
    return parent, small, big


def test_mig_instance_reads_its_own_memory_and_processes_board_from_parent(
    install: Any,
) -> None:
    parent, small, _ = mig_gpu()
    fake = install(parent)
    s = nvml.NvmlTelemetry("MIG-aaaa").sample()
    assert s.util_pct is None and s.own_util_pct is None  # NVML has no utilization on MIG
    assert s.extra["mig"] is True
    assert (s.mem_total_bytes, s.mem_used_bytes) == (10 * GiB, 2 * GiB)  # the instance's own
    assert s.mem_free_bytes == 8 * GiB
    assert [(p.pid, p.used_bytes) for p in s.processes or ()] == [(ME, 2 * GiB)]
    assert (s.temp_c, s.power_w, s.sm_clock_mhz) == (61.0, 300.0, 1755.0)
    assert s.pstate == "P0"
    assert s.error is None
    assert fake.count("nvmlDeviceGetUtilizationRates") == 0
    assert fake.count("nvmlDeviceGetProcessUtilization") == 0


def test_list_devices_lists_mig_instances_not_their_parent(install: Any) -> None:
    """Before: only parent GPUs were listed; the MIG-enabled parent is not holdable."""
    parent, _, _ = mig_gpu()
    disabled = FakeGpu("GPU-mig-off", mig_mode=pynvml.NVML_DEVICE_MIG_DISABLE, mem_total=40 * GiB)
    install(FakeGpu("GPU-plain", name="A100"), parent, disabled)
    devices = list_devices("nvidia")
    assert [(d.index, d.uuid, d.mem_total_bytes, d.parent_uuid) for d in devices] == [
        (0, "GPU-plain", 80 * GiB, None),
        (1, "MIG-aaaa", 10 * GiB, "GPU-parent"),
        (1, "MIG-bbbb", 40 * GiB, "GPU-parent"),
        (2, "GPU-mig-off", 40 * GiB, None),
    ]
    assert devices[1].name == "NVIDIA H100 80GB HBM3 MIG"


def test_mig_enabled_without_instances_lists_nothing_for_it(
    install: Any, caplog: pytest.LogCaptureFixture
) -> None:
    empty = FakeGpu("GPU-empty", mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE)
    install(empty, FakeGpu("GPU-plain"))
    with caplog.at_level(logging.WARNING, logger=nvml.__name__):
        assert [d.uuid for d in list_devices("nvidia")] == ["GPU-plain"]
    assert any("no MIG instance" in r.message for r in caplog.records)


# --- item 4: free memory is NVML's `free` -----------------------------------------------------


def test_free_memory_is_nvml_free_not_total_minus_used(install: Any) -> None:
    """v2 `used` leaves out the driver-reserved memory: total - used counted it as free."""
    gpu = with_me(UUID, mem_total=80 * GiB, mem_reserved=GiB, mem_used=77 * GiB + 512 * MiB,
                  procs=[(ME, 2 * GiB), (OTHER_PID, 75 * GiB)])
    install(gpu)
    s = nvml.NvmlTelemetry(UUID).sample()
    assert s.mem_free_reported_bytes == s.mem_free_bytes == GiB + 512 * MiB
    assert s.mem_used_bytes == 77 * GiB + 512 * MiB
    # The pressure rule (reserve: 2 % of 80 GiB = 1.6 GiB) sees the pressure in time.
    view = PressureRule(os.getuid()).update(s, {ME}, held=2 * GiB, target=2 * GiB,
                                            on_pressure="yield", now=0.0)
    assert view.status == "held"  # another user's process: hold against it, but seen


def test_free_memory_from_the_v1_query_too(install: Any) -> None:
    install(with_me(UUID, mem_reserved=GiB, mem_used=9 * GiB), driver_lacks=frozenset(
        {"nvmlDeviceGetMemoryInfo_v2"}))
    s = nvml.NvmlTelemetry(UUID).sample()
    assert (s.mem_used_bytes, s.mem_free_bytes) == (10 * GiB, 70 * GiB)  # v1 used has reserved


# --- item 12: process owners in a container -----------------------------------------------------


@pytest.fixture
def local_process() -> Any:
    """A real process of ours whose pid NVML will report as a (host) pid on the GPU."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait(timeout=10)


@pytest.mark.parametrize("host_pids", [True, False])
def test_owner_is_trusted_only_in_the_drivers_pid_namespace(
    install: Any, local_process: int, host_pids: bool
) -> None:
    """In a container NVML's pids are the host's: pid `local_process` on the GPU may be another
    user's process that only shares the number with ours. Before: its owner was looked up here
    and taken as ours, so `--on-pressure yield` gave memory away to a stranger."""
    gpu = with_me(UUID, mem_used=79 * GiB, procs=[(ME, 2 * GiB), (local_process, 77 * GiB)],
                  samples=[(ME, NOW_US - 10, 30)])
    install(gpu, host_pids=host_pids)
    s = nvml.NvmlTelemetry(UUID).sample()
    uids = {p.pid: p.uid for p in s.processes or ()}
    view = PressureRule(os.getuid()).update(s, {ME}, held=2 * GiB, target=2 * GiB,
                                            on_pressure="yield", now=0.0)
    if host_pids:
        assert uids == {ME: os.getuid(), local_process: os.getuid()}
        assert view.status == "yielded" and view.cap_bytes is not None and view.cap_bytes < 2 * GiB
        assert s.own_util_pct == 30.0 and s.extra["own_pid_visible"] is True
    else:
        assert uids == {ME: None, local_process: None}
        assert view.status == "held" and view.cap_bytes is None
        # Nor is the load of "our" pid taken as our own: the quiet probe decides.
        assert s.own_util_pct is None and s.extra["own_pid_visible"] is False
        assert attributed_others(s, {ME}) is None


def _unshare_pid() -> list[str] | None:
    """An `unshare` command line that runs a child in a new PID namespace, if allowed here."""
    if shutil.which("unshare") is None:
        return None
    for cmd in (["unshare", "--pid", "--fork"],
                ["unshare", "--user", "--map-root-user", "--pid", "--fork"]):
        if subprocess.run([*cmd, "true"], capture_output=True, timeout=30).returncode == 0:
            return cmd
    return None


def test_pid_namespace_check_on_real_processes() -> None:
    code = "from keepgpu.telemetry.nvml import in_initial_pid_namespace as f; print(f())"
    here = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()
    assert here == str(os.stat("/proc/self/ns/pid").st_ino == 0xEFFFFFFC)
    cmd = _unshare_pid()
    if cmd is None:
        pytest.skip("cannot create a PID namespace here")
    inside = subprocess.run([*cmd, sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.strip() == "False"


# --- item 7: the current SM clock ---------------------------------------------------------------


def test_sm_clock_is_the_current_sm_clock_in_mhz(install: Any) -> None:
    fake = install(with_me(UUID, sm_clock_mhz=345, sm_clock_max_mhz=1980))
    s = nvml.NvmlTelemetry(UUID).sample()
    assert s.sm_clock_mhz == 345.0  # an idle H200's clock, not the maximum
    assert s.status_fields()["sm_clock_mhz"] == 345.0
    assert ("nvmlDeviceGetClockInfo", (pynvml.NVML_CLOCK_SM,)) in fake.calls


def test_sm_clock_unknown_is_none(install: Any) -> None:
    install(with_me(UUID, fail={"nvmlDeviceGetClockInfo": NOT_SUPPORTED}))
    s = nvml.NvmlTelemetry(UUID).sample()
    assert s.sm_clock_mhz is None and s.error is None


# --- a driver older than the binding -------------------------------------------------------------


def test_process_list_version_mismatch_is_null_not_a_crash(install: Any) -> None:
    """pynvml raises NVMLLibraryMismatchError (not an NVMLError) when the driver lacks
    nvmlDeviceGetComputeRunningProcesses_v3. Before: it escaped sample()."""
    install(with_me(UUID), driver_lacks=frozenset({"nvmlDeviceGetComputeRunningProcesses"}))
    tel = nvml.NvmlTelemetry(UUID)
    s = tel.sample()
    assert s.processes is None and s.util_pct == 30.0 and s.error is None
    assert tel.sample().processes is None  # not retried


# --- scenario: NVML errors intermittently -----------------------------------------------------


def test_intermittent_error_is_null_plus_error_then_recovers(
    install: Any, caplog: pytest.LogCaptureFixture
) -> None:
    install(with_me(UUID, fail={"nvmlDeviceGetUtilizationRates": [UNKNOWN, None, UNKNOWN]}))
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
    stub = install(with_me(UUID))
    with pytest.raises(TelemetryUnavailable, match="GPU-nope"):
        nvml.NvmlTelemetry("GPU-nope")
    assert stub.inits == 1 and stub.shutdowns == 1
    assert nvml._init_count == 0


def test_init_failure_is_unavailable(install: Any) -> None:
    install(with_me(UUID), init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(TelemetryUnavailable, match="NVML unavailable"):
        nvml.NvmlTelemetry(UUID)
    with pytest.raises(TelemetryUnavailable):
        nvml_list.list_devices()


def test_init_is_reference_counted(install: Any) -> None:
    stub = install(with_me(UUID), with_me("GPU-two"))
    a, b = nvml.NvmlTelemetry(UUID), nvml.NvmlTelemetry("GPU-two")
    assert stub.inits == 1
    a.close()
    a.close()  # idempotent
    assert stub.shutdowns == 0
    assert b.sample().util_pct == 30.0
    b.close()
    assert stub.shutdowns == 1
    assert nvml_list.list_devices()[0].uuid == UUID
    assert (stub.inits, stub.shutdowns) == (2, 2)


def test_list_devices_skips_unreadable_device(install: Any) -> None:
    no_permission = {"nvmlDeviceGetHandleByIndex": pynvml.NVML_ERROR_NO_PERMISSION}
    install(with_me(UUID, name="A100"),
            with_me("GPU-bad", fail=no_permission),
            with_me("GPU-three", mem_total=24 * GiB, fail={"nvmlDeviceGetName": NOT_SUPPORTED}))
    devices = list_devices("nvidia")
    assert [(d.index, d.uuid, d.name, d.mem_total_bytes) for d in devices] == [
        (0, UUID, "A100", 80 * GiB),
        (2, "GPU-three", None, 24 * GiB),
    ]


def test_slowdown_threshold(install: Any) -> None:
    install(with_me(UUID))
    assert nvml.NvmlTelemetry(UUID).slowdown_temp_c() == 87.0


def test_open_telemetry_factory(install: Any) -> None:
    install(with_me(UUID))
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
        assert all(d.uuid for d in nvml_list.list_devices())
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
        "import keepgpu.telemetry.fake, keepgpu.telemetry.open, keepgpu.telemetry.nvml_list\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'amdsmi' not in sys.modules, 'amdsmi imported'\n"
        "assert pynvml.nvmlLib is None, 'NVML loaded at import'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
