"""The torch engine alone on a real NVIDIA GPU: no supervisor, so no pyzmq needed.

Judged by NVML and by CUDA events of the test's own around each pulse (never by the engine's own
estimate). Named to run after test_gpu_keep.py: this one opens a CUDA context in the test process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py (pynvml) is not installed")

if not torch.cuda.is_available() or not torch.version.cuda:
    pytest.skip("needs a CUDA GPU visible to torch", allow_module_level=True)
try:
    pynvml.nvmlInit()
except pynvml.NVMLError as exc:
    pytest.skip(f"needs NVML ({exc})", allow_module_level=True)

from keepgpu.worker.engines.torch_engine import TorchEngine  # noqa: E402

pytestmark = [pytest.mark.gpu]
MiB = 1024**2


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TorchEngine, Any]]:
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    raw = pynvml.nvmlDeviceGetUUID(h)
    uuid = raw.decode() if isinstance(raw, bytes) else str(raw)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuid)  # read by the engine, as in a worker
    eng = TorchEngine("cuda", expected_uuid=uuid, entry=uuid)
    yield eng, h
    eng.release()


@pytest.mark.timeout(120)
def test_uuid_name_and_memory_agree_with_nvml(engine: tuple[TorchEngine, Any]) -> None:
    eng, h = engine
    ident = eng.open()
    raw = pynvml.nvmlDeviceGetUUID(h)
    assert ident.uuid == (raw.decode() if isinstance(raw, bytes) else raw)
    assert ident.mem_total_bytes == pynvml.nvmlDeviceGetMemoryInfo(h).total
    sample = eng.telemetry().sample()
    assert sample.mem_total_bytes == ident.mem_total_bytes and sample.error is None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("asked_s", [0.002, 0.010])
def test_spin_pulses_last_what_is_asked(engine: tuple[TorchEngine, Any], asked_s: float) -> None:
    eng, _ = engine
    eng.open()
    measured = []
    for _ in range(60):  # ~the first second of a keeper; clocks ramp up meanwhile
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        eng.pulse("duty", asked_s)
        end.record()
        end.synchronize()
        measured.append(start.elapsed_time(end) / 1000.0)
        time.sleep(asked_s)  # the loop's off time at 50 % duty
    late = sorted(measured[-20:])
    median = late[len(late) // 2]
    assert median == pytest.approx(asked_s, rel=0.15), (asked_s, measured)


@pytest.mark.timeout(120)
def test_hold_and_release_as_nvml_sees_them(engine: tuple[TorchEngine, Any]) -> None:
    eng, h = engine
    eng.open()
    before = pynvml.nvmlDeviceGetMemoryInfo(h).used
    assert eng.resize(1024 * MiB) == 1024 * MiB
    assert pynvml.nvmlDeviceGetMemoryInfo(h).used - before >= 1000 * MiB
    eng.release()
    assert pynvml.nvmlDeviceGetMemoryInfo(h).used - before <= 64 * MiB
