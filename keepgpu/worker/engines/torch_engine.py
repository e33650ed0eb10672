"""The torch engine: holds VRAM in chunks and issues short pulses on cuda / rocm / mps / cpu.

This is the only module of keepgpu that imports torch, and only inside a worker process whose
device is already pinned through CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from keepgpu.telemetry.base import GpuSample, Telemetry, TelemetryUnavailable
from keepgpu.telemetry.null import NullTelemetry
from keepgpu.worker.engines.base import (
    CHUNK_BYTES,
    MAX_PULSE_S,
    ConfigurationError,
    DeviceIdentity,
    DutyMeter,
    EngineError,
)
from keepgpu.worker.engines.uuids import own_uuid, same_device

log = logging.getLogger("keepgpu.worker.torch")

_DUTY_WINDOW_S = 1.0
_PSTATE_ELEMS = 32 * 1024  # 128 KiB of float32: a kernel of a few microseconds
_CALIBRATE_WARMUP_S = 0.05
_SM_ELEMS = 16 * 1024**2  # 64 MiB of float32: ~65k blocks of 256 threads, every SM busy
_MM_N = 4096  # compute operand side; halved until one product takes ≤ MAX_PULSE_S / 4
_MM_MIN_N = 256
_MAX_LAUNCHES = 1000  # per pulse: bounds the CPU time spent queueing
_MIN_CYCLES_PER_S = 1.0e7
_MAX_CYCLES_PER_S = 1.0e11
_TIMED_PENDING = 8  # spin pulses whose CUDA event pair is not read back yet, at most
_TIMING_SAMPLES = 5  # the estimate is the median of the last this many measured spins
_MIN_TIMED_S = 1.0e-4  # shorter pulses are dominated by launch overhead: not used to re-scale


def _spin(cycles: int) -> None:
    """torch.cuda._sleep: one block of one thread spinning for `cycles` SM clock cycles."""
    torch.cuda._sleep(cycles)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class _Burst:
    """A kernel launch for sm/compute pulses and its measured seconds per launch."""

    op: Callable[[], object]
    seconds: float

    def launches(self, pulse_s: float) -> int:
        return max(1, min(_MAX_LAUNCHES, round(pulse_s / self.seconds)))


def _time_launch(op: Callable[[], object], reps: int) -> float:
    """Wall seconds per launch of `op` (after one warm-up launch)."""
    op()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        op()
    torch.cuda.synchronize()
    return max(1e-6, (time.perf_counter() - t0) / reps)


def _sm_burst(device: torch.device) -> _Burst:
    buf = torch.ones(_SM_ELEMS, device=device, dtype=torch.float32)

    def op() -> object:
        return buf.neg_()  # stays ±1 forever; tens of thousands of blocks per launch

    return _Burst(op, _time_launch(op, 20))


def _matmul(n: int, device: torch.device) -> Callable[[], object]:
    a = torch.randn(n, n, device=device, dtype=torch.float16).mul_(n**-0.5)
    out = torch.empty_like(a)

    def op() -> object:
        return torch.mm(a, a, out=out)

    return op


def _compute_burst(device: torch.device) -> _Burst:
    n = _MM_N
    while True:
        op = _matmul(n, device)
        seconds = _time_launch(op, 5)
        if seconds <= MAX_PULSE_S / 4 or n <= _MM_MIN_N:
            return _Burst(op, seconds)
        n //= 2


class TorchEngine:
    ignores_stop = False

    def __init__(self, backend: str, expected_uuid: str | None = None,
                 entry: str = "") -> None:
        if backend not in ("cuda", "rocm", "mps", "cpu"):
            raise ConfigurationError(f"unknown torch backend {backend!r}")
        self.kind = backend
        #: What the supervisor (NVML / AMD SMI, no torch) knows this device as; None = unknown.
        self.expected_uuid = expected_uuid or None
        self.entry = entry
        self._chunks: list[torch.Tensor] = []
        self._device = torch.device("cpu")
        self._uuid: str | None = None
        self._name: str | None = None
        self._event: Any = None
        self._cycles_per_s = 1.0e9
        self._clock_mhz: float | None = None  # SM clock of the latest telemetry sample
        self._timed: deque[tuple[Any, Any, int]] = deque()  # (start, end, cycles) in flight
        self._measured: deque[float] = deque(maxlen=_TIMING_SAMPLES)  # cycles/s of past spins
        self._spare: list[tuple[Any, Any]] = []  # event pairs already read back
        self._notices: list[str] = []
        self._bursts: dict[str, _Burst | None] = {}
        self._small: torch.Tensor | None = None
        self._meter = DutyMeter(_DUTY_WINDOW_S)
        self._telemetry: Telemetry | None = None

    # ---- device --------------------------------------------------------------------------

    def open(self) -> DeviceIdentity:
        total: int | None
        if self.kind in ("cuda", "rocm"):
            total = self._open_gpu()
        elif self.kind == "mps":
            if not torch.backends.mps.is_available():
                raise ConfigurationError("--engine mps: MPS is not available on this machine")
            self._device = torch.device("mps")
            self._name = "Apple MPS"
            total = int(torch.mps.recommended_max_memory())
        else:
            import psutil

            self._device = torch.device("cpu")
            self._name = "cpu"
            total = int(psutil.virtual_memory().total)
        self._small = torch.ones(_PSTATE_ELEMS, device=self._device)
        self._sync()
        return DeviceIdentity(self._uuid, self._name, total)

    def _open_gpu(self) -> int:
        hip = getattr(torch.version, "hip", None)
        if self.kind == "rocm" and not hip:
            raise ConfigurationError("--engine rocm: this torch build has no ROCm support")
        if self.kind == "cuda" and (hip or not torch.version.cuda):
            raise ConfigurationError("--engine cuda: this torch build has no CUDA support")
        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            raise ConfigurationError(f"--engine {self.kind}: no GPU visible to this worker")
        self._device = torch.device("cuda", 0)
        torch.cuda.set_device(0)
        props = torch.cuda.get_device_properties(0)
        self._uuid = self._check_uuid(getattr(props, "uuid", None))
        self._name = str(props.name)
        self._calibrate_sleep()
        return int(props.total_memory)

    def _check_uuid(self, raw: object) -> str | None:
        """The UUID telemetry is opened with: the supervisor's, once the runtime's own view
        agrees with it (raises ConfigurationError when they name different devices)."""
        pinned = os.environ.get("CUDA_VISIBLE_DEVICES", "") if self.kind == "cuda" else ""
        if self.expected_uuid and self.expected_uuid.startswith("MIG-"):
            pinned = self.expected_uuid
        own = own_uuid(self.kind, raw, pinned or self.entry)
        expected = self.expected_uuid
        if expected is None:
            return own
        if own is None:
            log.info("the runtime gives no usable UUID (%r): using the supervisor's %s",
                     raw, expected)
            return expected
        same = same_device(self.kind, own, expected)
        if same is False:
            raise ConfigurationError(
                f"device entry {self.entry or '?'} is {own} to the {self.kind} runtime, but "
                f"the supervisor expected {expected}: refusing to hold one GPU while "
                "watching another")
        if same is None:
            log.warning("cannot confirm that %s (runtime) is %s (supervisor): using the "
                        "supervisor's UUID", own, expected)
        return expected

    def _calibrate_sleep(self) -> None:
        """Cycles per second of torch.cuda._sleep, measured against wall time after ~50 ms of
        spinning has raised the clocks (an idle GPU starts slow). The controller corrects what
        clock changes leave over."""
        cycles = 2_000_000
        warm_until = time.perf_counter() + _CALIBRATE_WARMUP_S
        while time.perf_counter() < warm_until:
            _spin(cycles)
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _spin(cycles * 5)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        self._cycles_per_s = _bounded(cycles * 5 / max(elapsed, 1e-6))
        log.debug("spin kernel: %.3g cycles/s", self._cycles_per_s)

    @property
    def cycles_per_s(self) -> float:
        """The current estimate of torch.cuda._sleep cycles per wall second."""
        return self._cycles_per_s

    def observe(self, sample: GpuSample | None) -> None:
        """A telemetry sample was read (each control tick): follow the SM clock.

        clock64, which the spin kernel counts, ticks at the SM clock: when the clock moves
        (an H200 idles near 345 MHz and runs near 1980 MHz), the cycles per second move with
        it at once; the CUDA-event timing of each pulse corrects what is left.
        """
        mhz = getattr(sample, "sm_clock_mhz", None)  # getattr: older GpuSample lacks it
        if not isinstance(mhz, (int, float)) or mhz <= 0:
            return
        if self._clock_mhz is not None and mhz != self._clock_mhz:
            ratio = mhz / self._clock_mhz
            self._cycles_per_s = _bounded(self._cycles_per_s * ratio)
            self._measured = deque((_bounded(m * ratio) for m in self._measured),
                                   maxlen=_TIMING_SAMPLES)
        self._clock_mhz = float(mhz)

    def take_notices(self) -> list[str]:
        """Degradations since the last call (e.g. compute mode fell back to the spin kernel),
        for the worker to report as `error` messages."""
        out, self._notices = self._notices, []
        return out

    def _sync(self) -> None:
        if self.kind in ("cuda", "rocm"):
            torch.cuda.synchronize()
        elif self.kind == "mps":
            torch.mps.synchronize()

    # ---- memory --------------------------------------------------------------------------

    @property
    def held_bytes(self) -> int:
        return sum(int(c.numel()) for c in self._chunks)

    def resize(self, nbytes: int) -> int:
        while self.held_bytes > nbytes and self._chunks:
            self._chunks.pop()
        if self.kind in ("cuda", "rocm"):
            try:
                torch.cuda.empty_cache()
            except RuntimeError as exc:  # a device error surfacing at the next CUDA call
                raise EngineError(f"freeing memory failed: {exc}") from exc
        while self.held_bytes < nbytes:
            size = min(CHUNK_BYTES, nbytes - self.held_bytes)
            try:
                # zeros (not empty) so that host pages and unified memory are really committed
                chunk = torch.zeros(size, dtype=torch.uint8, device=self._device)
            except torch.OutOfMemoryError:
                log.warning("out of memory at %d bytes held; holding what we have", self.held_bytes)
                break
            except RuntimeError as exc:
                raise EngineError(f"allocation failed: {exc}") from exc
            self._chunks.append(chunk)
        return self.held_bytes

    # ---- activity ------------------------------------------------------------------------
    #
    # duty / pstate: torch.cuda._sleep, a <<<1,1>>> spin kernel calibrated to wall time: NVML
    #   reads the device as busy for exactly that long, at the least power (one SM, no memory).
    # sm: an in-place negation of a 64 MiB float32 buffer (tens of thousands of blocks): every
    #   SM gets warps, for monitors that read SM_ACTIVE; memory-bound, moderate power.
    # compute: fp16 matrix products on the tensor cores (one product well under a pulse): power
    #   rises as under real work, for reapers that corroborate utilization with power.
    # cpu / mps: a small in-place loop for the pulse's wall time whatever the mode.

    def pulse(self, mode: str, seconds: float) -> None:
        now = time.monotonic()
        seconds = min(seconds, MAX_PULSE_S)
        try:
            if self.kind in ("cuda", "rocm"):
                self._pulse_gpu(mode, seconds)
            else:
                self._pulse_sync(seconds)
        except RuntimeError as exc:  # the device fell over (lost, reset, ECC...)
            raise EngineError(f"pulse failed: {exc}") from exc
        self._meter.record(now, seconds)

    def _pulse_gpu(self, mode: str, seconds: float) -> None:
        self._read_timings()
        burst = self._burst(mode) if mode in ("sm", "compute") else None
        if burst is None:
            self._timed_spin(max(1, int(self._cycles_per_s * seconds)))
            return
        for _ in range(burst.launches(seconds)):
            burst.op()
        if self._event is None:
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self._event.record()

    def _timed_spin(self, cycles: int) -> None:
        """One spin kernel between two timing events, read back later without blocking."""
        pair = None
        if len(self._timed) < _TIMED_PENDING:
            pair = self._spare.pop() if self._spare else (
                torch.cuda.Event(enable_timing=True),  # type: ignore[no-untyped-call]
                torch.cuda.Event(enable_timing=True))  # type: ignore[no-untyped-call]
            pair[0].record()
        _spin(cycles)
        if pair is None:
            if self._event is None or self._event in [t[1] for t in self._timed]:
                self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record()
            return
        pair[1].record()
        self._timed.append((pair[0], pair[1], cycles))
        self._event = pair[1]

    def _read_timings(self) -> None:
        """Re-scale cycles per second from every finished spin (event.query() never blocks).

        A spin asked for `s` seconds from a stale estimate runs s * (true / estimated) on the
        device: the events measure that, so the estimate follows clock changes within a few
        pulses whatever the cause (boost, thermal slowdown, power capping). The median of the
        last few keeps one pulse stretched by a host stall (the CPU preempted between the
        start event and the launch) from skewing the next ones.
        """
        while self._timed and bool(self._timed[0][1].query()):
            start, end, cycles = self._timed.popleft()
            seconds = float(start.elapsed_time(end)) / 1000.0
            self._spare.append((start, end))
            if seconds < _MIN_TIMED_S:
                continue
            self._measured.append(_bounded(cycles / seconds))
            self._cycles_per_s = statistics.median(self._measured)

    def _burst(self, mode: str) -> _Burst | None:
        """The kernel for an sm/compute pulse, built on first use (None: fall back to the spin
        kernel, e.g. when the device has no room for the operands)."""
        if mode in self._bursts:
            return self._bursts[mode]
        self._bursts.clear()  # one mode's operands at a time
        try:
            burst = _sm_burst(self._device) if mode == "sm" else _compute_burst(self._device)
        except torch.OutOfMemoryError:
            log.warning("no memory for %s-mode operands: pulsing with the spin kernel", mode)
            burst = None
        except RuntimeError as exc:  # e.g. CUBLAS_STATUS_NOT_INITIALIZED: no tensor cores
            note = f"{mode} mode unavailable ({exc}): pulsing with the spin kernel"
            log.warning("%s", note)
            self._notices.append(note)
            burst = None
        if burst is not None:
            log.info("%s pulses: %.3f ms per launch", mode, burst.seconds * 1000)
        self._bursts[mode] = burst
        return burst

    def _pulse_sync(self, seconds: float) -> None:
        """cpu/mps: small work repeated until `seconds` of wall time passed."""
        assert self._small is not None
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self._small.mul_(0.999)
            self._small.add_(0.001)
        self._sync()

    def busy(self) -> bool:
        if self._event is None:
            return False
        try:
            return not bool(self._event.query())
        except RuntimeError as exc:  # the device fell over while the pulse ran
            raise EngineError(f"device error: {exc}") from exc

    def own_duty(self) -> float:
        return self._meter.fraction()

    def telemetry(self) -> Telemetry:
        if self._telemetry is None:
            self._telemetry = self._open_telemetry()
        return self._telemetry

    def _open_telemetry(self) -> Telemetry:
        backend = {"cuda": "nvml", "rocm": "amdsmi"}.get(self.kind)
        if backend is None or self._uuid is None:
            return NullTelemetry(self._uuid, self._name)
        from keepgpu.telemetry.open import open_telemetry

        try:
            return open_telemetry(backend, self._uuid)
        except TelemetryUnavailable as exc:
            log.warning("no telemetry for %s: %s", self._uuid, exc)
            return NullTelemetry(self._uuid, self._name)

    def release(self) -> None:
        self._chunks.clear()
        self._bursts.clear()
        self._small = None
        self._event = None
        self._timed.clear()
        self._spare.clear()
        try:
            self._sync()
            if self.kind in ("cuda", "rocm"):
                torch.cuda.empty_cache()
        except RuntimeError as exc:  # memory goes with the process anyway
            raise EngineError(f"release failed: {exc}") from exc


def _bounded(cycles_per_s: float) -> float:
    return max(_MIN_CYCLES_PER_S, min(_MAX_CYCLES_PER_S, cycles_per_s))
