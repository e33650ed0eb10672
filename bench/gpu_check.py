"""The GPU check: keepgpu on one real NVIDIA GPU in under 6 minutes, judged by NVML read directly.

Run through scripts/gpu-check.sh on the device machine (it brings pyzmq from ./.whl). Checks, in
this order (most decisive first; a time guard skips what would overrun the budget):
  release     VRAM held as asked, then free again within join+kill timeouts after the `stop`
              command, SIGTERM and SIGKILL of the supervisor (NVML used memory, polled 2 ms)
  auto        `--engine auto` resolves to cuda
  fields      status uuid, name, mem_total_bytes, temp_c, power_w, pstate against NVML
  util        NVML utilization.gpu at --target-util 30 sampled at 4 Hz over 60 s: mean, min;
              status target_reachable
  backoff     a competing fp16 matmul loop: `backoff/busy` within 2 s, its throughput within 1 %
              of running alone
  pause       in every mode: `pause` -> NVML utilization 0 while paused, `resume` -> pulses again
Results: one JSON under --out (bench/results format). Exit 0 all passed, 1 some check failed,
2 no GPU / pyzmq (one line, nothing measured).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import aim, arg_parser, clean_env, log, utc_now, write_result
from gpu_common import (
    FREE_SLACK_BYTES,
    GIB,
    Gpu,
    Keeper,
    Sampler,
    column,
    device_info,
    keepgpu,
    nv,
    preflight,
    wait_idle,
    wait_mem,
)

BUDGET_S = 270.0  # with the engine tests (<= 90 s) the whole run stays under 6 min
RELEASE_BOUND_S = 10.0  # --join-timeout 5 + --kill-timeout 5
TARGET = 30
MODES = ("duty", "sm", "compute", "pstate")
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
json.dump(marks, open(out, "w"))
"""


class Run:
    """The checks' verdicts and numbers, and the time budget."""

    def __init__(self, gpu: Gpu) -> None:
        self.gpu = gpu
        self.t0 = time.monotonic()
        self.aims: list[dict[str, Any]] = []
        self.numbers: dict[str, Any] = {}
        self.notes: list[str] = []

    def left(self) -> float:
        return BUDGET_S - (time.monotonic() - self.t0)

    def check(self, name: str, measured: float | None, limit: float, unit: str,
              cmp: str = "<=") -> None:
        self.aims.append(aim(name, measured, limit, unit, cmp))
        ok = self.aims[-1]["met"]
        log(f"{'PASS' if ok else 'FAIL'} {name}: {measured} {unit} (aim {cmp} {limit})")


def keeper(gpu: Gpu, engine: str = "cuda", **opts: Any) -> Keeper:
    os.environ["BENCH_KEEPGPU_ENGINE"] = engine  # read by Keeper.start()
    k = keepgpu(gpu, heartbeat=0.2, start_timeout=120, **opts)
    k.start()
    return k


def check_release(run: Run, base_used: int) -> None:
    for method in ("command", "sigterm", "sigkill"):
        if run.left() < 40:
            run.notes.append(f"release/{method} skipped: out of time")
            continue
        k = keeper(run.gpu, vram="4GiB")
        try:
            held_s = k.wait_held(base_used, 4 * GIB)
            run.numbers[f"release_{method}_start_to_held_s"] = round(held_s, 2)
            t_stop = time.monotonic()
            k.stop(method)
            t_free = wait_mem(run.gpu, lambda used: used <= base_used + FREE_SLACK_BYTES,
                              RELEASE_BOUND_S + 5)
            freed = None if t_free is None else round(t_free - t_stop, 3)
            run.check(f"release/{method}: VRAM free (NVML)", freed, RELEASE_BOUND_S, "s")
        finally:
            k.close()
        wait_idle(run.gpu, base_used, 30)


def check_fields(run: Run, g: dict[str, Any], config: dict[str, Any]) -> None:
    gpu, h = run.gpu, run.gpu.handle
    run.check("auto: --engine auto resolves to cuda", float(config.get("engine") == "cuda"),
              1, "bool", ">=")
    run.check("fields: uuid = NVML", float(g["uuid"] == gpu.uuid), 1, "bool", ">=")
    run.check("fields: name = NVML", float(g["name"] == gpu.name), 1, "bool", ">=")
    run.check("fields: mem_total_bytes = NVML",
              float(g["mem_total_bytes"] == gpu.mem_total_bytes), 1, "bool", ">=")
    temp = nv("nvmlDeviceGetTemperature", h, 0)  # NVML_TEMPERATURE_GPU
    if g["temp_c"] is not None and temp is not None:
        run.check("fields: |temp_c - NVML|", abs(g["temp_c"] - temp), 5, "C")
    power = nv("nvmlDeviceGetPowerUsage", h)
    if g["power_w"] is not None and power is not None:
        run.check("fields: |power_w - NVML| / NVML",
                  round(abs(g["power_w"] - power / 1000) / max(power / 1000, 1), 3), 0.5, "ratio")
    pstate = nv("nvmlDeviceGetPerformanceState", h)
    run.check("fields: pstate = NVML", float(g["pstate"] == f"P{pstate}"), 1, "bool", ">=")
    run.numbers["status_fields"] = {k: g.get(k) for k in (
        "uuid", "name", "mem_total_bytes", "temp_c", "power_w", "pstate", "sm_clock_mhz",
        "target_reachable")}
    run.numbers["nvml_fields"] = {"uuid": gpu.uuid, "name": gpu.name,
                                  "mem_total_bytes": gpu.mem_total_bytes, "temp_c": temp,
                                  "power_w": None if power is None else power / 1000,
                                  "pstate": pstate}


def check_util(run: Run, k: Keeper, sampler: Sampler) -> None:
    if run.left() < 80:
        run.notes.append("util skipped: out of time")
        return
    time.sleep(10)  # the controller settles and NVML's window fills
    t0 = time.monotonic()
    time.sleep(60)
    util = column(sampler.between(t0, time.monotonic()), "util")
    mean = sum(util) / len(util) if util else None
    run.numbers["util_samples"] = len(util)
    run.numbers["util_min"] = min(util) if util else None
    run.check(f"util: |mean - {TARGET}| over 60 s at 4 Hz",
              None if mean is None else round(abs(mean - TARGET), 2), 5, "points")
    run.check("util: samples >= 2 Hz x 60 s", len(util), 120, "samples", ">=")
    assert k.sup is not None
    g = k.sup.status()["gpus"][0]
    run.check("util: status target_reachable", float(g.get("target_reachable") is True), 1,
              "bool", ">=")


def _competitor(seconds: float, out: Path, uuid: str) -> subprocess.Popen[bytes]:
    env = clean_env()
    env["CUDA_VISIBLE_DEVICES"] = uuid
    return subprocess.Popen([sys.executable, "-c", COMPETITOR, str(seconds), str(out)], env=env)


def _rate(marks: list[list[float]], start: float) -> float:
    after = [m for m in marks if m[0] >= start]
    if len(after) < 2:
        return 0.0
    return (after[-1][1] - after[0][1]) / max(after[-1][0] - after[0][0], 1e-9)


def check_backoff(run: Run, k: Keeper, alone: float, tmp: Path) -> None:
    if run.left() < 30:
        run.notes.append("backoff skipped: out of time")
        return
    assert k.sup is not None
    out = tmp / "shared.json"
    proc = _competitor(14, out, run.gpu.uuid)
    backoff_at = None
    while proc.poll() is None:
        st = k.sup.try_status()
        g = st["gpus"][0] if st else {}
        if backoff_at is None and (g.get("state"), g.get("reason")) == ("backoff", "busy"):
            backoff_at = time.time()
        time.sleep(0.1)
    marks = json.loads(out.read_text()) if proc.returncode == 0 else []
    started = marks[0][0] if marks else None
    delay = None if backoff_at is None or started is None else round(backoff_at - started, 2)
    run.check("backoff: busy within (s after the competitor's first product)", delay, 2.0, "s")
    shared = _rate(marks, (backoff_at or 0) + 1.0) if marks else 0.0
    run.numbers["competitor_alone_per_s"] = round(alone, 2)
    run.numbers["competitor_shared_per_s"] = round(shared, 2)
    run.check("backoff: competitor throughput vs alone", round(shared / max(alone, 1e-9), 4),
              0.99, "ratio", ">=")
    k.sup.wait_for(lambda s: s["gpus"][0]["state"] == "holding", 20)


def check_pause(run: Run, k: Keeper, sampler: Sampler) -> None:
    assert k.sup is not None
    for mode in MODES:
        if run.left() < 12:
            run.notes.append(f"pause/{mode} skipped: out of time")
            continue
        k.sup.call("set", {"mode": mode})
        time.sleep(3)
        before = column(sampler.between(time.monotonic() - 2, time.monotonic()), "util")
        k.sup.call("pause")
        time.sleep(1.5)  # NVML's window (<= 1 s) drains
        t0 = time.monotonic()
        time.sleep(2.5)
        paused = column(sampler.between(t0, time.monotonic()), "util")
        state = k.sup.status()["gpus"][0]
        k.sup.call("resume")
        run.numbers[f"pause_{mode}_util_before_max"] = max(before) if before else None
        run.check(f"pause/{mode}: NVML util max while paused", max(paused) if paused else None,
                  0, "%")
        run.check(f"pause/{mode}: status says paused",
                  float((state["state"], state["reason"]) == ("backoff", "paused")), 1, "bool",
                  ">=")


def main() -> int:
    p = arg_parser(__doc__.splitlines()[0])
    args = p.parse_args()
    gpu = preflight("gpu_check", 0, with_peer=False)  # exits 2 without a GPU or pyzmq
    started = utc_now()
    run = Run(gpu)
    base_used = gpu.mem_used()
    tmp = Path(tempfile.mkdtemp(prefix="kgcheck-"))
    alone_out = tmp / "alone.json"
    if _competitor(8, alone_out, gpu.uuid).wait(120) == 0:
        alone_marks = json.loads(alone_out.read_text())
        alone = _rate(alone_marks, alone_marks[0][0] + 2)
    else:
        alone = 0.0
        run.notes.append("competitor alone failed")
    wait_idle(gpu, base_used, 30)
    check_release(run, base_used)
    sampler = Sampler(gpu, hz=4.0)
    sampler.start()
    k = keeper(gpu, engine="auto", vram="1GiB", target_util=TARGET)
    try:
        k.wait_held(base_used, GIB)
        assert k.sup is not None
        st = k.sup.status()
        time.sleep(1.0)  # one heartbeat with readings
        check_fields(run, k.sup.status()["gpus"][0], st["supervisor"]["config"])
        check_util(run, k, sampler)
        check_backoff(run, k, alone, tmp)
        check_pause(run, k, sampler)
    finally:
        k.close()
        sampler.stop()
    run.numbers["elapsed_s"] = round(time.monotonic() - run.t0, 1)
    tools = [{"tool": "keepgpu", "config": {"vram": "1GiB", "target_util": TARGET},
              "results": run.numbers}]
    write_result(args.out, "gpu_check", "gpu", tools, run.aims, device_info(gpu), run.notes,
                 started)
    failed = [a["aim"] for a in run.aims if not a["met"]]
    log(f"gpu_check: {len(run.aims) - len(failed)}/{len(run.aims)} passed"
        + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed or run.notes else 0


if __name__ == "__main__":
    sys.exit(main())
