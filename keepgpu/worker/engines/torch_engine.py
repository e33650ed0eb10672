"""The torch engine: holds VRAM in chunks and issues short pulses on cuda / rocm / mps / cpu.

This is the only module of keepgpu that imports torch, and only inside a worker process whose
device is already pinned through CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from keepgpu.telemetry.base import Telemetry, TelemetryUnavailable
from keepgpu.telemetry.null import NullTelemetry
from keepgpu.worker.engines.base import (
    CHUNK_BYTES,
    ConfigurationError,
    DeviceIdentity,
    DutyMeter,
    EngineError,
)

log = logging.getLogger("keepgpu.worker.torch")

_DUTY_WINDOW_S = 1.0
_PSTATE_ELEMS = 32 * 1024  # 128 KiB of float32: a kernel of a few microseconds


class TorchEngine:
    ignores_stop = False

    def __init__(self, backend: str) -> None:
        if backend not in ("cuda", "rocm", "mps", "cpu"):
            raise ConfigurationError(f"unknown torch backend {backend!r}")
        self.kind = backend
        self._chunks: list[torch.Tensor] = []
        self._device = torch.device("cpu")
        self._uuid: str | None = None
        self._name: str | None = None
        self._event: Any = None
        self._cycles_per_s = 1.0e9
        self._mm: dict[str, tuple[torch.Tensor, float]] = {}
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
        raw_uuid = getattr(props, "uuid", None)
        if raw_uuid is not None:
            text = str(raw_uuid)
            prefix = "GPU-" if self.kind == "cuda" and not text.startswith(("GPU-", "MIG-")) else ""
            self._uuid = prefix + text
        self._name = str(props.name)
        self._calibrate_sleep()
        return int(props.total_memory)

    def _calibrate_sleep(self) -> None:
        """Cycles per second of torch.cuda._sleep, measured against wall time."""
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda._sleep(cycles * 5)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        self._cycles_per_s = max(1.0e7, cycles * 5 / max(elapsed, 1e-6))
        log.debug("spin kernel: %.3g cycles/s", self._cycles_per_s)

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
            torch.cuda.empty_cache()
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

    def pulse(self, mode: str, seconds: float) -> None:
        now = time.monotonic()
        try:
            if self.kind in ("cuda", "rocm"):
                self._pulse_gpu(mode, seconds)
            else:
                self._pulse_sync(seconds)
        except RuntimeError as exc:  # the device fell over (lost, reset, ECC...)
            raise EngineError(f"pulse failed: {exc}") from exc
        self._meter.record(now, seconds)

    def _pulse_gpu(self, mode: str, seconds: float) -> None:
        if mode in ("duty", "pstate") or self._small is None:
            torch.cuda._sleep(max(1, int(self._cycles_per_s * seconds)))
        else:
            x, per_mm = self._matmul_operand(mode)
            for _ in range(max(1, round(seconds / per_mm))):
                torch.mm(x, x)
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record()

    def _matmul_operand(self, mode: str) -> tuple[torch.Tensor, float]:
        """A square operand for sm/compute pulses and the measured seconds per product."""
        if mode not in self._mm:
            n = 1024 if mode == "sm" else 4096
            x = torch.randn(n, n, device=self._device, dtype=torch.float16)
            torch.mm(x, x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                torch.mm(x, x)
            torch.cuda.synchronize()
            self._mm[mode] = (x, max(1e-6, (time.perf_counter() - t0) / 10))
        return self._mm[mode]

    def _pulse_sync(self, seconds: float) -> None:
        """cpu/mps: small work repeated until `seconds` of wall time passed."""
        assert self._small is not None
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self._small.mul_(0.999)
            self._small.add_(0.001)
        self._sync()

    def busy(self) -> bool:
        return self._event is not None and not bool(self._event.query())

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
        self._mm.clear()
        self._small = None
        self._sync()
        if self.kind in ("cuda", "rocm"):
            torch.cuda.empty_cache()
