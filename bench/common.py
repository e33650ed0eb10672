"""Shared helpers for the benchmarks: machine and version info, statistics, result files, and a
fake-engine supervisor started as a real subprocess (cleaned up by pid, whatever happens).

Result files (bench/results/<benchmark>-<UTC stamp>.json) all have one shape:
  {"benchmark", "level": "cpu"|"gpu", "date", "machine", "device", "versions",
   "tools": [{"tool", "config", "metrics"}], "aims": [{"aim", "limit", "measured", "unit",
   "met"}], "notes"}
bench/render.py turns them into bench/RESULTS.md and bench/plots/*.png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
_QUIET: list[float] = []

# ---- machine, versions, result files ----------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def machine_info() -> dict[str, Any]:
    """The host the benchmark ran on (no hostname: results are published)."""
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": psutil.virtual_memory().total,
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "arch": platform.machine(),
        "host_cpu_busy_pct_before": _QUIET[0] if _QUIET else None,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def wait_quiet(max_wait_s: float = 120.0, below_pct: float = 15.0) -> None:
    """Wait (bounded) until the host's CPUs are less than `below_pct` % busy over 2 s (none of
    our processes run at that point), so that other work on a shared machine disturbs the
    measurement as little as possible. The figure is recorded in the result either way."""
    deadline = time.monotonic() + max_wait_s
    busy = psutil.cpu_percent(interval=2.0)
    if busy >= below_pct:
        log(f"waiting up to {max_wait_s:g}s for the machine to be quiet (CPU {busy:.0f}% busy)")
    while busy >= below_pct and time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=2.0)
    _QUIET[:] = [round(busy, 1)]


def _git_commit() -> str | None:
    """The checked-out commit of the repository holding bench/ (+ '-dirty'), if it is one."""
    try:
        head = subprocess.run(["git", "-C", str(BENCH_DIR), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(BENCH_DIR), "status", "--porcelain",
                                "--untracked-files=no", "--", str(BENCH_DIR.parent / "keepgpu")],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, Any]:
    """Versions of everything measured; read from package metadata (torch is not imported)."""
    from keepgpu._version import __version__ as keepgpu_version

    try:
        import zmq

        libzmq: str | None = zmq.zmq_version()
    except ImportError:
        libzmq = None
    return {
        "keepgpu": keepgpu_version,
        "keepgpu_commit": _git_commit(),
        "keep_gpu": _dist_version("keep-gpu", "keep_gpu"),
        "torch": _dist_version("torch"),
        "pyzmq": _dist_version("pyzmq"),
        "libzmq": libzmq,
        "nvidia_ml_py": _dist_version("nvidia-ml-py"),
        "psutil": _dist_version("psutil"),
    }


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def aim(name: str, measured: float | None, limit: float, unit: str, cmp: str = "<="
        ) -> dict[str, Any]:
    """One aim of the issue with its measured figure; `met` is None when nothing was measured."""
    met: bool | None = None
    if measured is not None and not math.isnan(measured):
        met = measured <= limit if cmp == "<=" else measured >= limit
    return {"aim": name, "limit": limit, "cmp": cmp, "measured": measured, "unit": unit,
            "met": met}


def write_result(
    out_dir: Path,
    benchmark: str,
    level: str,
    tools: list[dict[str, Any]],
    aims: list[dict[str, Any]] | None = None,
    device: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    started: dt.datetime | None = None,
) -> Path:
    """Write one run's result file and return its path."""
    when = started or utc_now()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": benchmark,
        "level": level,
        "date": when.isoformat().replace("+00:00", "Z"),
        "machine": machine_info(),
        "device": device or {"name": "none (keepgpu fake engine)", "driver": None},
        "versions": versions(),
        "tools": tools,
        "aims": aims or [],
        "notes": notes or [],
    }
    path = out_dir / f"{benchmark}-{when.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"{benchmark}: wrote {path}", file=sys.stderr)
    return path


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"directory for the result JSON (default {RESULTS_DIR})")
    return p


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in 0..100."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: Iterable[float], digits: int = 4) -> dict[str, Any]:
    """n, min, p50, mean, p90, p99, max of `values` (rounded)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0}

    def r(x: float) -> float:
        return round(x, digits)

    return {
        "n": len(vals),
        "min": r(min(vals)),
        "p50": r(percentile(vals, 50)),
        "mean": r(sum(vals) / len(vals)),
        "p90": r(percentile(vals, 90)),
        "p99": r(percentile(vals, 99)),
        "max": r(max(vals)),
    }


# ---- processes --------------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """Kernel state letter of `pid` ('Z' zombie), None when it no longer exists."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            rest = fh.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return rest[0] if rest else None


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an exited child not yet reaped)."""
    return proc_state(pid) not in (None, "Z", "X")


def kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of `pids` is alive; returns those still alive at the timeout."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.005)


def clean_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without any KEEPGPU_* setting (a user's defaults must not leak in)."""
    base = os.environ if base is None else base
    return {k: v for k, v in base.items() if not k.startswith("KEEPGPU_")
            and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}


def short_tmpdir(prefix: str) -> Path:
    """A fresh 0700 directory with a short path (ipc socket paths are limited to 107 bytes)."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


class Supervisor:
    """A `keepgpu-supervise` subprocess with its own runtime dir, name and notify socket.

    Use as a context manager: on exit the supervisor and every worker it ever reported are
    SIGKILLed by pid if still there, and the runtime dir is removed.
    """

    def __init__(
        self,
        gpus: int | None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        engine: str = "fake",
        name: str = "bench",
    ) -> None:
        self.dir = short_tmpdir("kgb-")
        self.name = name
        self.endpoint = f"ipc://{self.dir}/{name}.ctl"
        self.log_path = self.dir / "supervisor.log"
        self.argv = [sys.executable, "-m", "keepgpu.cli.supervise", "--engine", engine,
                     "--name", name, *args]
        self.env = clean_env()
        self.env["KEEPGPU_RUNTIME_DIR"] = str(self.dir)
        if gpus is not None:
            self.env["KEEPGPU_FAKE_GPUS"] = str(gpus)
        self.env.update(env or {})
        self.notify_path = str(self.dir / "notify.sock")
        self.env["NOTIFY_SOCKET"] = self.notify_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_spawn = 0.0
        self.worker_pids: set[int] = set()
        self._notify: socket.socket | None = None
        self._log_fh: Any = None

    # -- lifecycle --

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(self.notify_path)
        self._log_fh = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.t_spawn = time.monotonic()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_fh, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def close(self) -> None:
        """Kill whatever is left (by pid), then remove the runtime dir."""
        if self.proc is not None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    self.worker_pids.add(child.pid)
            if self.proc.poll() is None:
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        kill_pids(p for p in self.worker_pids if alive(p))
        left = wait_gone(self.worker_pids, 10)
        if left:
            log(f"WARNING: worker pids {left} survived SIGKILL")
        if self._notify is not None:
            self._notify.close()
        if self._log_fh is not None:
            self._log_fh.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- control --

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0
             ) -> dict[str, Any]:
        from keepgpu.client import Client

        return Client(self.endpoint, timeout=timeout).call(cmd, args)

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        result = self.call("status", timeout=timeout)
        for gpu in result.get("gpus", []):
            if isinstance(gpu.get("pid"), int):
                self.worker_pids.add(gpu["pid"])
        return result

    def try_status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        from keepgpu.client import CommandFailed, NoSupervisor

        try:
            return self.status(timeout=timeout)
        except (NoSupervisor, CommandFailed):
            return None

    def wait_ready(self, timeout: float) -> float:
        """Seconds from spawn until the supervisor's sd_notify READY=1 (every GPU holding or
        failed). Raises RuntimeError on timeout or if some GPU is not holding then."""
        assert self._notify is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                raise RuntimeError(f"no READY within {timeout:g}s:\n{self.log_tail()}")
            self._notify.settimeout(min(left, 0.5))
            try:
                data = self._notify.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in data.split(b"\n"):
                t = time.monotonic() - self.t_spawn
                break
        states = [g["state"] for g in self.status()["gpus"]]
        if any(s not in ("holding", "backoff") for s in states):
            raise RuntimeError(f"READY but not every GPU holds: {states}\n{self.log_tail()}")
        return t

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
                 poll_s: float = 0.01) -> float:
        """Monotonic time at which a `status` result first satisfied `pred` (polled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.try_status()
            if st is not None and pred(st):
                return time.monotonic()
            time.sleep(poll_s)
        raise RuntimeError(f"condition not met within {timeout:g}s:\n{self.log_tail()}")


def gpu_entry(status: dict[str, Any], gpu: int) -> dict[str, Any]:
    for entry in status["gpus"]:
        if entry["gpu"] == gpu:
            return dict(entry)
    raise KeyError(gpu)
