"""GPU-level helpers: NVML (every call through one funnel), a background sampler, and the two
keepers (keepgpu and KeepGPU / PyPI keep-gpu) started as processes pinned to one GPU by UUID.

The benchmark process itself never imports torch (it would open a CUDA context and skew the
power and memory readings); only the keepers and the workload processes do.
Without an NVIDIA driver every GPU script stops with exit code 2 and one clear line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from common import Supervisor, alive, clean_env, kill_pids, log, short_tmpdir, wait_gone

MIB = 1024**2
GIB = 1024**3
FREE_SLACK_BYTES = 128 * MIB  # "memory free again": used <= used before the keeper + this
HELD_FRACTION = 0.97  # "holding": used >= used before the keeper + this fraction of --vram
EXIT_NO_GPU = 2

# ---- NVML -------------------------------------------------------------------------------------

_nvml: Any = None


def fail(what: str, msg: str) -> None:
    print(f"{what}: ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(EXIT_NO_GPU)


def nv(name: str, *args: Any) -> Any:
    """Call pynvml.<name>(*args); None when the device does not support or cannot answer it."""
    try:
        return getattr(_nvml, name)(*args)
    except _nvml.NVMLError:
        return None


@dataclass
class Gpu:
    handle: Any
    index: int
    uuid: str
    name: str
    driver: str | None
    cuda_driver: str | None
    mem_total_bytes: int
    power_limit_w: float | None
    max_sm_clock_mhz: int | None

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "driver": self.driver, "cuda_driver": self.cuda_driver,
                "uuid": self.uuid, "nvml_index": self.index,
                "mem_total_bytes": self.mem_total_bytes, "power_limit_w": self.power_limit_w,
                "max_sm_clock_mhz": self.max_sm_clock_mhz}

    def mem_used_or_none(self) -> int | None:
        info = nv("nvmlDeviceGetMemoryInfo", self.handle)
        return int(info.used) if info is not None else None

    def mem_used(self) -> int:
        """NVML used memory in bytes; raises when NVML cannot say (no number is better than a
        wrong one: every hold and release verdict rests on it)."""
        used = self.mem_used_or_none()
        if used is None:
            raise RuntimeError(f"NVML gives no memory reading for {self.uuid}")
        return used

    def processes(self) -> list[int]:
        procs = nv("nvmlDeviceGetComputeRunningProcesses", self.handle) or []
        return [int(p.pid) for p in procs]

    def energy_mj(self) -> int | None:
        value = nv("nvmlDeviceGetTotalEnergyConsumption", self.handle)
        return int(value) if value is not None else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def require_gpu(what: str, index: int) -> Gpu:
    """Open NVML and GPU `index`, or exit 2 with one line saying why there is no GPU."""
    global _nvml
    try:
        import pynvml
    except ImportError:
        fail(what, "nvidia-ml-py (pynvml) is not installed; GPU benchmarks need the device "
             "machine (see bench/README.md)")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        fail(what, f"no NVIDIA GPU or driver here (NVML: {exc}); GPU benchmarks need the device "
             "machine (see bench/README.md); nothing was measured")
    _nvml = pynvml
    count = nv("nvmlDeviceGetCount") or 0
    if index >= count:
        fail(what, f"GPU {index} not found: NVML sees {count} GPU(s)")
    h = pynvml.nvmlDeviceGetHandleByIndex(index)
    cuda = nv("nvmlSystemGetCudaDriverVersion")
    limit = nv("nvmlDeviceGetEnforcedPowerLimit", h)
    gpu = Gpu(
        handle=h, index=index, uuid=_text(pynvml.nvmlDeviceGetUUID(h)),
        name=_text(pynvml.nvmlDeviceGetName(h)),
        driver=_text(nv("nvmlSystemGetDriverVersion") or "") or None,
        cuda_driver=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
        mem_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
        power_limit_w=limit / 1000.0 if limit else None,
        max_sm_clock_mhz=nv("nvmlDeviceGetMaxClockInfo", h, pynvml.NVML_CLOCK_SM),
    )
    others = gpu.processes()
    if others:
        fail(what, f"GPU {index} ({gpu.uuid}) already runs compute processes {others}; "
             "benchmarks need an otherwise idle GPU")
    log(f"{what}: GPU {index} {gpu.name} {gpu.uuid}, driver {gpu.driver}, "
        f"{gpu.mem_total_bytes / GIB:.1f} GiB")
    return gpu


def require_module(what: str, module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        fail(what, f"python module {module!r} is not importable: {hint}")


def preflight(what: str, index: int, with_peer: bool) -> Gpu:
    """Every GPU benchmark's checks before it measures: the GPU, pyzmq, and keep-gpu when
    KeepGPU is among the tools. Exits 2 with one line when something is missing."""
    gpu = require_gpu(what, index)
    if with_peer:
        require_module(what, "keep_gpu", "bring the keep-gpu 1.0.0 wheel (bench/README.md)")
    require_module(what, "zmq", "bring the pyzmq wheel (bench/README.md)")
    return gpu


# ---- sampling ---------------------------------------------------------------------------------

FIELDS = ("t", "util", "mem_used", "power_w", "sm_mhz", "pstate", "temp_c")


class Sampler(threading.Thread):
    """Samples NVML at `hz` into rows of FIELDS (t = monotonic seconds) until stop()."""

    def __init__(self, gpu: Gpu, hz: float = 4.0) -> None:
        super().__init__(daemon=True, name="nvml-sampler")
        self.gpu = gpu
        self.period = 1.0 / hz
        self.rows: list[tuple[Any, ...]] = []
        self._halt = threading.Event()

    def read(self) -> tuple[Any, ...]:
        h = self.gpu.handle
        util = nv("nvmlDeviceGetUtilizationRates", h)
        power = nv("nvmlDeviceGetPowerUsage", h)
        return (
            time.monotonic(),
            int(util.gpu) if util is not None else None,
            self.gpu.mem_used_or_none(),
            power / 1000.0 if power is not None else None,
            nv("nvmlDeviceGetClockInfo", h, _nvml.NVML_CLOCK_SM),
            nv("nvmlDeviceGetPerformanceState", h),
            nv("nvmlDeviceGetTemperature", h, _nvml.NVML_TEMPERATURE_GPU),
        )

    def run(self) -> None:
        next_t = time.monotonic()
        while not self._halt.is_set():
            self.rows.append(self.read())
            next_t += self.period
            self._halt.wait(max(0.0, next_t - time.monotonic()))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def between(self, t0: float, t1: float) -> list[tuple[Any, ...]]:
        return [r for r in list(self.rows) if t0 <= r[0] <= t1]


def column(rows: list[tuple[Any, ...]], name: str) -> list[Any]:
    i = FIELDS.index(name)
    return [r[i] for r in rows if r[i] is not None]


def wait_mem(gpu: Gpu, pred: Callable[[int], bool], timeout: float, poll_s: float = 0.002
             ) -> float | None:
    """Monotonic time at which NVML used memory first satisfied `pred`; None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred(gpu.mem_used()):
            return time.monotonic()
        time.sleep(poll_s)
    return None


def wait_idle(gpu: Gpu, base_used: int, timeout: float = 60.0) -> bool:
    """Wait until no compute process is left and memory is back to `base_used` (+ slack)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not gpu.processes() and gpu.mem_used() <= base_used + FREE_SLACK_BYTES:
            return True
        time.sleep(0.05)
    return False


# ---- keepers ----------------------------------------------------------------------------------


@dataclass
class Keeper:
    """One keeper run on one GPU: keepgpu (a supervisor and its worker) or KeepGPU (one process
    with a thread per GPU). `stop(method)` with method command | sigterm | sigkill."""

    tool: str
    config: dict[str, Any]
    gpu: Gpu
    sup: Supervisor | None = None
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    t_spawn: float = 0.0
    pids: set[int] = field(default_factory=set)
    _log: Any = None
    _stop_thread: threading.Thread | None = None
    _ready_thread: threading.Thread | None = None
    _ready_s: float | None = None
    _claims_deadline: float | None = None

    @property
    def main_pid(self) -> int:
        if self.sup is not None:
            return self.sup.pid
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = {"CUDA_VISIBLE_DEVICES": self.gpu.uuid}
        if self.tool == "keepgpu":
            args = [f"--{k.replace('_', '-')}={v}" for k, v in self.config.items()]
            self.sup = Supervisor(None, args, env, engine=os.environ.get(
                "BENCH_KEEPGPU_ENGINE", "cuda"), name="gpubench")
            self.sup.start()
            self.t_spawn = self.sup.t_spawn
            self._ready_thread = threading.Thread(target=self._wait_ready, daemon=True)
            self._ready_thread.start()
        else:
            self.workdir = short_tmpdir("kgpeer-")  # KeepGPU may write logs/ under its cwd
            argv = [sys.executable, "-m", "keep_gpu.cli"]
            argv += [f"--{k.replace('_', '-')}={v}" for k, v in self.config.items()]
            full_env = clean_env()
            full_env.update(env)
            self._log = open(self.workdir / "keep-gpu.log", "wb")  # noqa: SIM115
            self.t_spawn = time.monotonic()
            self.proc = subprocess.Popen(argv, env=full_env, cwd=self.workdir,
                                         stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pids.add(self.main_pid)

    def exited(self) -> bool:
        p = self.sup.proc if self.sup is not None else self.proc
        return p is None or p.poll() is not None

    def log_tail(self, lines: int = 15) -> str:
        if self.sup is not None:
            return self.sup.log_tail(lines)
        assert self.workdir is not None
        text = (self.workdir / "keep-gpu.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait_held(self, base_used: int, vram_bytes: int, timeout: float = 90.0) -> float:
        """Seconds from spawn until NVML shows `vram_bytes` (x HELD_FRACTION) more in use.
        Fails early (device time is scarce) when the keeper exits, when a keepgpu worker
        restarts or turns fatal, or when KeepGPU says it keeps the GPU but holds nothing."""
        deadline = time.monotonic() + timeout
        want = base_used + HELD_FRACTION * vram_bytes
        next_check = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if self.gpu.mem_used() >= want:
                self.track()
                return time.monotonic() - self.t_spawn
            if self.exited():
                raise RuntimeError(f"{self.tool} exited before holding:\n{self.log_tail()}")
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                self._check_progress(deadline)
                deadline = min(deadline, self._claims_deadline or deadline)
            time.sleep(0.002)
        raise RuntimeError(f"{self.tool} not holding within {timeout:g}s (NVML used "
                           f"{self.gpu.mem_used()} bytes, before {base_used}):\n{self.log_tail()}")

    def _check_progress(self, deadline: float) -> None:
        if self.sup is not None:
            st = self.sup.try_status()
            for g in (st or {}).get("gpus", []):
                if g["state"] in ("fatal", "unkillable") or g["restarts"]:
                    raise RuntimeError(f"keepgpu worker failed ({g['state']}, restarts "
                                       f"{g['restarts']}, {g['error']}):\n{self.log_tail()}")
        elif self._claims_deadline is None and "Keeping GPUs awake" in self.log_tail(50):
            # KeepGPU reports success before its first allocation; give it 15 s to allocate.
            self._claims_deadline = min(deadline, time.monotonic() + 15.0)

    def track(self) -> None:
        """Remember every descendant pid (for cleanup by pid)."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.main_pid).children(recursive=True):
                self.pids.add(child.pid)

    def _wait_ready(self) -> None:
        assert self.sup is not None
        try:
            self._ready_s = self.sup.wait_ready(timeout=180)
        except Exception as exc:  # noqa: BLE001 - reported as "no READY"
            log(f"keepgpu: no READY: {str(exc)[:300]}")

    def ready_s(self) -> float | None:
        """keepgpu only: seconds from spawn until its READY (every GPU holding), received as it
        was sent by a thread started with the supervisor."""
        if self._ready_thread is None:
            return None
        self._ready_thread.join(timeout=30)
        return self._ready_s

    def host_rss(self) -> dict[str, Any]:
        """Host RSS in MB: the main process, its descendants, and per GPU worker."""
        self.track()
        main = psutil.Process(self.main_pid)
        kids = main.children(recursive=True)
        rss_main = main.memory_info().rss / 1e6
        rss_kids = [k.memory_info().rss / 1e6 for k in kids]
        out: dict[str, Any] = {"main_mb": round(rss_main, 1),
                               "children_mb": [round(x, 1) for x in rss_kids],
                               "total_mb": round(rss_main + sum(rss_kids), 1),
                               "threads_main": main.num_threads()}
        # keepgpu: one worker process per GPU; KeepGPU: one thread per GPU in one process.
        out["per_gpu_worker_mb"] = round(rss_kids[0], 1) if self.sup and rss_kids else \
            round(rss_main, 1)
        return out

    def stop(self, method: str) -> None:
        """Start releasing: returns at once (a keepgpu `stop` command waits in a thread)."""
        if method == "command" and self.sup is not None:
            sup = self.sup

            def ask() -> None:
                with contextlib.suppress(Exception):
                    sup.call("stop", timeout=120)

            self._stop_thread = threading.Thread(target=ask, daemon=True)
            self._stop_thread.start()
            return
        sig = {"command": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
        os.kill(self.main_pid, sig[method])  # KeepGPU's own stop is Ctrl+C (SIGINT)

    def close(self) -> None:
        """SIGKILL whatever is left, by pid, and wait for it."""
        self.track()
        kill_pids(p for p in self.pids if alive(p))
        if self.sup is not None:
            self.sup.close()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        left = wait_gone(self.pids, 10)
        if left:
            log(f"WARNING: {self.tool} pids {left} survived SIGKILL")
        if self._log is not None:
            self._log.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def wait_exit(self, timeout: float) -> float | None:
        """Seconds until the keeper's main process has exited; None on timeout."""
        p = self.sup.proc if self.sup is not None else self.proc
        assert p is not None
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return time.monotonic()


def keepgpu(gpu: Gpu, **opts: Any) -> Keeper:
    """keepgpu-supervise on `gpu` with the given options (names as in --help, `_` for `-`)."""
    return Keeper("keepgpu", dict(opts), gpu)


def peer(gpu: Gpu, **opts: Any) -> Keeper:
    """KeepGPU's blocking CLI (`keep-gpu [--interval S] [--vram X] ...`) on `gpu` only."""
    return Keeper("KeepGPU", dict(opts), gpu)


def idle_context(gpu: Gpu) -> subprocess.Popen[bytes]:
    """A process that only opens a CUDA context on `gpu` (the power baseline); returns once
    the context is up."""
    code = ("import sys, time, torch; torch.cuda.init(); x = torch.zeros(1, device='cuda'); "
            "torch.cuda.synchronize(); print('up', flush=True); time.sleep(3600)")
    env = clean_env()
    env["CUDA_VISIBLE_DEVICES"] = gpu.uuid
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"up":
        proc.kill()
        raise RuntimeError("the idle-context process failed to open a CUDA context")
    return proc


def device_info(gpu: Gpu) -> dict[str, Any]:
    info = gpu.info()
    info["dry_run"] = os.environ.get("BENCH_KEEPGPU_ENGINE", "cuda") != "cuda"
    return info
