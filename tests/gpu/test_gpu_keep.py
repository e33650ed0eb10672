"""The keep loop on a real NVIDIA GPU, judged by NVML readings (never by keepgpu's own claims).

Run on a GPU machine: `python -m pytest tests/gpu -v`. Skipped, with the reason, where pyzmq is
missing (the supervisor's sockets need it: bring its wheel, see bench/README.md), torch sees no
CUDA device or NVML cannot be initialised. Each test starts its own supervisor
(`--engine cuda --gpus 0`) and cleans it up by pid; competitors and memory eaters are
subprocesses pinned to the same device.
"""

from __future__ import annotations

import bisect
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kgtest import Sup, wait_until

if importlib.util.find_spec("zmq") is None:
    pytest.skip("pyzmq is not installed: the supervisor tests need it (bring its wheel, see "
                "bench/README.md); tests/gpu/test_gpu_torch_engine.py runs without it",
                allow_module_level=True)
torch = pytest.importorskip("torch", reason="torch is not installed")
pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py (pynvml) is not installed")

pytestmark = [pytest.mark.gpu]

GiB = 1024**3
MiB = 1024**2
SAMPLE_HZ = 4.0  # NVML utilization sampled at 4 Hz (the issue asks for >= 2 Hz)

# A competitor: fp16 matmuls back to back; writes [(wall time, products done), ...].
COMPETITOR = """
import json, sys, time, torch
duration, out = float(sys.argv[1]), sys.argv[2]
x = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
y = torch.empty_like(x)
for _ in range(5):
    torch.mm(x, x, out=y)
torch.cuda.synchronize()
marks, n, start = [], 0, time.time()
marks.append((start, 0))
while time.time() - start < duration:
    for _ in range(10):
        torch.mm(x, x, out=y)
    torch.cuda.synchronize()
    n += 10
    marks.append((time.time(), n))
with open(out, "w") as fh:
    json.dump(marks, fh)
"""

# A memory eater of our own user: allocates 64 MiB at a time until NVML free memory is below
# `leave` bytes, says so on stdout, holds for `hold` seconds, exits (freeing everything).
EATER = """
import sys, time, torch, pynvml
uuid, leave, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByUUID(uuid)
torch.zeros(1, device="cuda")
chunks = []
while pynvml.nvmlDeviceGetMemoryInfo(h).free > leave:
    chunks.append(torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda"))
torch.cuda.synchronize()
print("allocated", len(chunks), flush=True)
time.sleep(hold)
"""


def _nvml_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    return True


if not _nvml_ready():
    pytest.skip("needs a CUDA GPU with NVML", allow_module_level=True)


class Nvml:
    """Readings of NVML device 0; the keeper is started on it by UUID (`--gpus GPU-...`), and
    the test process itself never opens a CUDA context."""

    def __init__(self) -> None:
        self.h = pynvml.nvmlDeviceGetHandleByIndex(0)
        raw = pynvml.nvmlDeviceGetUUID(self.h)
        self.uuid = raw.decode() if isinstance(raw, bytes) else str(raw)

    def util(self) -> float:
        return float(pynvml.nvmlDeviceGetUtilizationRates(self.h).gpu)

    def used(self) -> int:
        return int(pynvml.nvmlDeviceGetMemoryInfo(self.h).used)

    def total(self) -> int:
        return int(pynvml.nvmlDeviceGetMemoryInfo(self.h).total)

    def pids(self) -> set[int]:
        return {int(p.pid) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(self.h)}

    def sample_util(self, seconds: float) -> list[float]:
        out = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            out.append(self.util())
            time.sleep(1.0 / SAMPLE_HZ)
        return out


@pytest.fixture
def nvml() -> Iterator[Nvml]:
    yield Nvml()


@pytest.fixture
def keeper(start_sup: Callable[..., Sup], nvml: Nvml
           ) -> Callable[..., tuple[Sup, dict[str, Any]]]:
    def start(*args: str) -> tuple[Sup, dict[str, Any]]:
        sup = start_sup("--engine", "cuda", "--gpus", nvml.uuid, "--heartbeat", "0.2",
                        "--start-timeout", "120", *args)
        g = sup.wait_states("holding", timeout=120)[0]
        return sup, g

    return start


def _child_env(entry: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPGPU_")}
    env["CUDA_VISIBLE_DEVICES"] = entry
    return env


def _run_competitor(entry: str, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", COMPETITOR, str(seconds), str(out)],
                            env=_child_env(entry))


def _rate(marks: list[list[float]], start: float, end: float) -> float:
    """Products per second between wall times `start` and `end` (linear between marks)."""
    times = [m[0] for m in marks]

    def count(t: float) -> float:
        i = min(max(bisect.bisect_left(times, t), 1), len(times) - 1)
        (t0, n0), (t1, n1) = marks[i - 1], marks[i]
        return n0 + (n1 - n0) * (t - t0) / max(t1 - t0, 1e-9)

    return (count(end) - count(start)) / (end - start)


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_vram_held_as_asked_and_all_free_after_release(keeper: Any, nvml: Nvml) -> None:
    before = nvml.used()
    sup, g = keeper("--vram", "8GiB")
    assert g["uuid"] == nvml.uuid
    assert g["held_bytes"] == 8 * GiB
    held = nvml.used() - before
    # the hold plus a CUDA context (a few hundred MiB), nothing like the whole device
    assert 8 * GiB <= held <= 8 * GiB + 2 * GiB, held
    assert g["pid"] in nvml.pids()
    result = sup.call("stop", timeout=30)
    assert result["gpus"][0]["outcome"] == "released"
    assert sup.proc.wait(30) == 0
    wait_until(lambda: g["pid"] not in nvml.pids(), 10)
    assert nvml.used() - before <= 64 * MiB


@pytest.mark.timeout(200)
@pytest.mark.parametrize("target", [10, 30, 60])
def test_nvml_utilization_sits_at_the_target(keeper: Any, nvml: Nvml, target: int) -> None:
    sup, _ = keeper("--vram", "1GiB", "--target-util", str(target))
    time.sleep(15)  # the controller settles (and NVML's window fills)
    samples = nvml.sample_util(60)
    mean = sum(samples) / len(samples)
    assert len(samples) >= 2 * 60
    assert abs(mean - target) <= 5.0, (mean, min(samples), max(samples))
    g = sup.gpus()[0]
    assert (g["state"], g["reason"]) == ("holding", None)


@pytest.mark.timeout(240)
def test_competing_matmul_makes_the_keeper_back_off(keeper: Any, nvml: Nvml,
                                                    tmp_path: Path) -> None:
    entry = nvml.uuid  # CUDA_VISIBLE_DEVICES accepts UUIDs
    alone_out = tmp_path / "alone.json"
    assert _wait(_run_competitor(entry, 12, alone_out), 120) == 0
    alone = json.loads(alone_out.read_text())
    alone_rate = _rate(alone, alone[0][0] + 2, alone[-1][0])

    sup, _ = keeper("--vram", "1GiB", "--target-util", "30")
    time.sleep(5)
    shared_out = tmp_path / "shared.json"
    proc = _run_competitor(entry, 16, shared_out)
    backoff_at = None
    while proc.poll() is None:
        g = sup.gpus()[0]
        if backoff_at is None and (g["state"], g["reason"]) == ("backoff", "busy"):
            backoff_at = time.time()
        time.sleep(0.1)
    assert proc.returncode == 0
    shared = json.loads(shared_out.read_text())
    assert backoff_at is not None, "the keeper never backed off"
    assert backoff_at - shared[0][0] <= 2.0, backoff_at - shared[0][0]
    shared_rate = _rate(shared, backoff_at + 1.0, shared[-1][0])
    assert shared_rate >= 0.99 * alone_rate, (shared_rate, alone_rate)
    back = wait_until(lambda: (g := sup.gpus()[0])["state"] == "holding" and g, 15)
    assert back["reason"] is None


@pytest.mark.timeout(240)
def test_pressure_from_our_own_process_yields_then_regrows(keeper: Any, nvml: Nvml) -> None:
    sup, g = keeper("--vram", "8GiB")
    total = nvml.total()
    reserve = max(512 * MiB, int(total * 0.02))
    eater = subprocess.Popen(
        [sys.executable, "-c", EATER, g["uuid"], str(reserve // 2), "10"],
        env=_child_env(nvml.uuid), stdout=subprocess.PIPE,
    )
    try:
        assert eater.stdout is not None
        assert eater.stdout.readline().startswith(b"allocated")
        yielded = wait_until(lambda: (x := sup.gpus()[0])["held_bytes"] < 8 * GiB and x, 5)
        assert (yielded["state"], yielded["reason"]) == ("backoff", "pressure")
        assert _wait(eater, 60) == 0
    finally:
        if eater.poll() is None:
            eater.kill()
            eater.wait(10)
    back = wait_until(lambda: (x := sup.gpus()[0])["held_bytes"] == 8 * GiB and x, 60)
    assert (back["state"], back["reason"]) == ("holding", None)
    assert back["pid"] == g["pid"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["sm", "compute"])
def test_sm_and_compute_modes_reach_the_target(keeper: Any, nvml: Nvml, mode: str) -> None:
    sup, _ = keeper("--vram", "1GiB", "--mode", mode, "--target-util", "30")
    time.sleep(15)
    samples = nvml.sample_util(30)
    mean = sum(samples) / len(samples)
    assert abs(mean - 30) <= 8.0, (mode, mean)
    assert sup.gpus()[0]["error"] is None


@pytest.mark.timeout(120)
def test_pstate_mode_keeps_clocks_up_at_almost_no_utilization(keeper: Any, nvml: Nvml) -> None:
    sup, _ = keeper("--vram", "1GiB", "--mode", "pstate")
    time.sleep(10)
    samples = nvml.sample_util(15)
    assert sum(samples) / len(samples) < 5.0
    assert pynvml.nvmlDeviceGetPerformanceState(nvml.h) != 8  # not P8 (idle)
    clock = pynvml.nvmlDeviceGetClockInfo(nvml.h, pynvml.NVML_CLOCK_SM)
    top = pynvml.nvmlDeviceGetMaxClockInfo(nvml.h, pynvml.NVML_CLOCK_SM)
    assert clock >= 0.5 * top, (clock, top)
