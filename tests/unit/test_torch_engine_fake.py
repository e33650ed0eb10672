"""The torch engine's real code on a fake CUDA/ROCm device, faked at torch's own binding.

The fakes stand where torch 2.13's Python layer meets the device (torch/cuda/__init__.py,
torch/cuda/streams.py, torch/_C/__init__.pyi): `torch.cuda.get_device_properties` returns an
object with `_CudaDeviceProperties`' fields (name, total_memory, uuid printed as 16 bytes of
hex), `torch.cuda._sleep(cycles)` queues a spin that lasts cycles / SM clock on a simulated
device timeline, `torch.cuda.Event` records on that timeline (`query()` without blocking,
`elapsed_time()` in milliseconds, only with `enable_timing=True`). Tensors for "cuda" live on
the CPU. Everything of keepgpu above that is the code that runs on hardware.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from keepgpu.protocol.units import VramRequest  # noqa: E402
from keepgpu.supervisor.config import SupervisorConfig  # noqa: E402
from keepgpu.supervisor.devices import Device  # noqa: E402
from keepgpu.telemetry.base import GpuSample  # noqa: E402
from keepgpu.telemetry.null import NullTelemetry  # noqa: E402
from keepgpu.worker.engines import torch_engine  # noqa: E402
from keepgpu.worker.engines.base import ConfigurationError, EngineError  # noqa: E402
from keepgpu.worker.engines.torch_engine import TorchEngine  # noqa: E402
from keepgpu.worker.settings import Settings  # noqa: E402

MiB = 1024**2
GPU_UUID = "5a3f8e2c-1b4d-4c6e-9f0a-7b8c9d0e1f23"
# ROCr "GPU-bb0ac32b1c2c644a" as HIP/torch print it: the hex of the 16 characters.
ROCM_TORCH_UUID = "62623061-6333-3262-3163-326336343461"
H200_IDLE_MHZ = 345.0
H200_LOAD_MHZ = 1980.0


class FakeDevice:
    """One GPU's stream as a timeline on the host clock: work queued runs after earlier work."""

    def __init__(self, mhz: float) -> None:
        self.mhz = mhz
        self.free_at = 0.0
        self.spins: list[tuple[float, float, int]] = []  # (start, end, cycles)
        self.query_error: str | None = None
        self.empty_cache_error: str | None = None

    def queue(self, seconds: float) -> tuple[float, float]:
        start = max(time.perf_counter(), self.free_at)
        self.free_at = start + seconds
        return start, self.free_at

    def spin(self, cycles: int) -> None:
        start, end = self.queue(cycles / (self.mhz * 1e6))  # clock64 counts SM cycles
        self.spins.append((start, end, cycles))

    def synchronize(self, device: object = None) -> None:
        time.sleep(max(0.0, self.free_at - time.perf_counter()))

    def empty_cache(self) -> None:
        if self.empty_cache_error:
            raise RuntimeError(self.empty_cache_error)

    def last_spin_s(self) -> float:
        start, end, _ = self.spins[-1]
        return end - start


class FakeUuid:
    """torch's _CUuuid: str() gives the 16 bytes as hex in 8-4-4-4-12 groups, no prefix."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


class FakeProps:
    def __init__(self, uuid: str | None) -> None:
        self.name = "NVIDIA H200"
        self.total_memory = 141 * 1024**3
        self.multi_processor_count = 132
        if uuid is not None:
            self.uuid = FakeUuid(uuid)


def make_event_class(dev: FakeDevice) -> type:
    class FakeEvent:
        def __init__(self, enable_timing: bool = False, blocking: bool = False,
                     interprocess: bool = False, external: bool = False) -> None:
            self.enable_timing = enable_timing
            self.at: float | None = None

        def record(self, stream: object = None) -> None:
            self.at = max(time.perf_counter(), dev.free_at)

        def query(self) -> bool:
            if dev.query_error:
                raise RuntimeError(dev.query_error)
            return self.at is None or time.perf_counter() >= self.at

        def elapsed_time(self, end_event: FakeEvent) -> float:
            if not (self.enable_timing and end_event.enable_timing):
                raise RuntimeError("Both events must be created with argument enable_timing=True")
            assert self.at is not None and end_event.at is not None
            return (end_event.at - self.at) * 1000.0

    return FakeEvent


def _on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeDevice]]:
    def install(kind: str = "cuda", uuid: str | None = GPU_UUID, mhz: float = H200_IDLE_MHZ,
                visible: str = "0") -> FakeDevice:
        dev = FakeDevice(mhz)
        monkeypatch.setattr(torch.version, "cuda", "13.0" if kind == "cuda" else None)
        monkeypatch.setattr(torch.version, "hip", "7.0.0" if kind == "rocm" else None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: FakeProps(uuid))
        monkeypatch.setattr(torch.cuda, "synchronize", dev.synchronize)
        monkeypatch.setattr(torch.cuda, "empty_cache", dev.empty_cache)
        monkeypatch.setattr(torch.cuda, "_sleep", dev.spin)
        monkeypatch.setattr(torch.cuda, "Event", make_event_class(dev))
        for name in ("zeros", "ones", "randn", "empty_like"):
            monkeypatch.setattr(torch, name, _on_cpu(getattr(torch, name)))
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        return dev

    yield install


def pulse_until_idle(engine: TorchEngine, mode: str, seconds: float, count: int) -> None:
    """Pulses the way the keep loop issues them: the next only once the previous is done."""
    for _ in range(count):
        engine.pulse(mode, seconds)
        deadline = time.monotonic() + 2.0
        while engine.busy():
            assert time.monotonic() < deadline, "pulse never finished"
            time.sleep(0.001)


# --- item 1 / 5: the UUID telemetry is opened with -------------------------------------------


def test_cuda_uuid_gets_the_nvml_gpu_prefix(fake_gpu: Any) -> None:
    fake_gpu()
    assert TorchEngine("cuda").open().uuid == "GPU-" + GPU_UUID


def test_rocm_uuid_is_decoded_from_the_hex_of_rocr_text(fake_gpu: Any) -> None:
    fake_gpu("rocm", uuid=ROCM_TORCH_UUID)
    assert TorchEngine("rocm").open().uuid == "GPU-bb0ac32b1c2c644a"


def test_rocm_telemetry_is_opened_with_the_supervisors_amd_smi_uuid(
        fake_gpu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu("rocm", uuid=ROCM_TORCH_UUID)
    amd_smi_uuid = "e7ff74a1-0000-1000-80ff-bb0ac32b1c2c644a"
    opened: list[tuple[str, str | None]] = []

    def fake_open(backend: str, uuid: str | None) -> NullTelemetry:
        opened.append((backend, uuid))
        return NullTelemetry(uuid)

    monkeypatch.setattr("keepgpu.telemetry.open.open_telemetry", fake_open)
    engine = TorchEngine("rocm", expected_uuid=amd_smi_uuid, entry="0")
    assert engine.open().uuid == amd_smi_uuid
    engine.telemetry()
    assert opened == [("amdsmi", amd_smi_uuid)]


def test_mig_pinned_entry_keeps_the_mig_prefix(fake_gpu: Any) -> None:
    mig = "MIG-" + GPU_UUID
    fake_gpu(visible=mig)
    assert TorchEngine("cuda", entry=mig).open().uuid == mig


def test_mig_uuid_from_the_supervisor_keeps_the_mig_prefix(fake_gpu: Any) -> None:
    fake_gpu(visible="0")  # pinned by index, but the supervisor knows it is a MIG instance
    mig = "MIG-" + GPU_UUID
    assert TorchEngine("cuda", expected_uuid=mig, entry="0").open().uuid == mig


def test_runtime_and_supervisor_disagreeing_is_a_configuration_error(fake_gpu: Any) -> None:
    fake_gpu()
    other = "GPU-00000000-1111-2222-3333-444444444444"
    with pytest.raises(ConfigurationError, match="expected GPU-00000000"):
        TorchEngine("cuda", expected_uuid=other, entry="1").open()


def test_supervisors_uuid_stands_in_when_the_runtime_has_none(fake_gpu: Any) -> None:
    fake_gpu(uuid=None)
    expected = "GPU-" + GPU_UUID
    assert TorchEngine("cuda", expected_uuid=expected).open().uuid == expected


def test_supervisor_passes_its_uuid_to_the_worker() -> None:
    from pathlib import Path

    from keepgpu.protocol.runtime import Paths
    from keepgpu.supervisor.lifecycle import SlotLifecycle

    lc = SlotLifecycle(SupervisorConfig(), [Device(0, "3", "GPU-" + GPU_UUID)], "nvidia",
                       Paths(Path("/tmp"), "x"), clock=lambda: 0.0, worker_stderr=None,
                       send=lambda slot, kind, **fields: True)
    wire_settings = lc._settings_for(lc.slots[0])
    assert Settings.from_wire(wire_settings).uuid == "GPU-" + GPU_UUID


# --- item 7: spin pulses last what they are asked for, whatever the SM clock ------------------


def test_spin_pulses_follow_the_sm_clock_through_cuda_events(fake_gpu: Any) -> None:
    dev = fake_gpu(mhz=H200_IDLE_MHZ)
    engine = TorchEngine("cuda")
    engine.open()  # calibrated at the idle clock
    dev.mhz = H200_LOAD_MHZ  # the clock rises under load: 5.7x more cycles per second
    pulse_until_idle(engine, "duty", 0.010, 1)
    first = dev.last_spin_s()
    assert first < 0.004  # the stale calibration: the reported bug
    pulse_until_idle(engine, "duty", 0.010, 6)
    assert dev.last_spin_s() == pytest.approx(0.010, rel=0.15)
    assert engine.cycles_per_s == pytest.approx(H200_LOAD_MHZ * 1e6, rel=0.15)


def test_spin_cycles_scale_at_once_with_the_sm_clock_of_a_sample(fake_gpu: Any) -> None:
    dev = fake_gpu(mhz=H200_IDLE_MHZ)
    engine = TorchEngine("cuda")
    engine.open()
    engine.observe(GpuSample(sm_clock_mhz=H200_IDLE_MHZ))
    dev.mhz = H200_LOAD_MHZ
    engine.observe(GpuSample(sm_clock_mhz=H200_LOAD_MHZ))
    pulse_until_idle(engine, "duty", 0.010, 1)  # the very first pulse, no event read yet
    assert dev.last_spin_s() == pytest.approx(0.010, rel=0.15)
    engine.observe(GpuSample())  # no clock in the sample: nothing changes
    assert engine.cycles_per_s == pytest.approx(H200_LOAD_MHZ * 1e6, rel=0.15)


# --- item 9: device errors -------------------------------------------------------------------


def test_a_device_error_in_busy_is_an_engine_error(fake_gpu: Any) -> None:
    dev = fake_gpu()
    engine = TorchEngine("cuda")
    engine.open()
    engine.pulse("duty", 0.002)
    dev.query_error = "CUDA error: an illegal memory access was encountered"
    with pytest.raises(EngineError, match="illegal memory access"):
        engine.busy()


def test_a_device_error_in_empty_cache_is_an_engine_error(fake_gpu: Any) -> None:
    dev = fake_gpu()
    engine = TorchEngine("cuda")
    engine.open()
    assert engine.resize(2 * MiB) == 2 * MiB
    dev.empty_cache_error = "CUDA error: unspecified launch failure"
    with pytest.raises(EngineError, match="launch failure"):
        engine.resize(MiB)


def test_cublas_failure_in_compute_mode_falls_back_to_the_spin_kernel(
        fake_gpu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = fake_gpu()
    engine = TorchEngine("cuda")
    engine.open()

    def no_cublas(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling "
                           "`cublasCreate(handle)`")

    monkeypatch.setattr(torch, "mm", no_cublas)
    spins = len(dev.spins)
    pulse_until_idle(engine, "compute", 0.005, 3)  # no exception: no crash loop
    assert len(dev.spins) == spins + 3
    notes = engine.take_notices()
    assert len(notes) == 1 and "CUBLAS_STATUS_NOT_INITIALIZED" in notes[0]
    assert engine.take_notices() == []


class Sock:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes, flags: int = 0) -> None:
        self.sent.append(data)


def test_the_worker_reports_the_fallback_as_an_error_message(
        fake_gpu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from keepgpu.worker.run import KeepLoop

    fake_gpu()
    monkeypatch.setattr(torch, "mm", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("CUBLAS_STATUS_NOT_INITIALIZED")))
    monkeypatch.setattr(torch_engine.TorchEngine, "telemetry", lambda self: NullTelemetry())
    sock = Sock()
    settings = Settings(engine="cuda", vram=VramRequest(bytes=MiB), mode="compute")
    loop = KeepLoop(sock, TorchEngine("cuda"), settings)  # type: ignore[arg-type]
    loop.start()
    loop.engine.pulse("compute", 0.002)
    loop._control(time.monotonic())
    messages = [json.loads(m) for m in sock.sent]
    errors = [m for m in messages if m["t"] == "error"]
    assert len(errors) == 1 and "spin kernel" in errors[0]["message"]
