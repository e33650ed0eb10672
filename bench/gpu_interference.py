"""GPU level: interference — throughput of a reference bf16 matmul loop and of a small training
loop (bench/gpu_workload.py, its own process) alone, then with each keeper on the same GPU.

Conditions, in order: alone, keepgpu (defaults: duty 30 %, busy threshold 10 %), KeepGPU
defaults, KeepGPU --interval 1, alone again. Each keeper holds 1 GiB and runs `--settle` seconds
before the workload starts; the workload warms up (--warmup, the keeper's reaction time) before
it is timed. Interference = throughput loss vs the mean of the two alone runs, in %; the two
alone runs' difference is the noise floor. keepgpu's status is polled during the workload to
show whether (and when) it backed off.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import aim, arg_parser, clean_env, log, utc_now, write_result
from gpu_common import (
    GIB,
    Gpu,
    Keeper,
    Sampler,
    device_info,
    keepgpu,
    peer,
    preflight,
    require_module,
    wait_idle,
)
from gpu_metrics import UTIL, series

CONDITIONS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "alone": (None, {}),
    "keepgpu": ("keepgpu", {}),
    "KeepGPU-default": ("KeepGPU", {}),
    "KeepGPU-interval1": ("KeepGPU", {"interval": 1}),
    "alone-after": (None, {}),
}
WORKLOAD = Path(__file__).resolve().parent / "gpu_workload.py"


def run_workload(gpu: Gpu, warmup: float, seconds: float) -> dict[str, float]:
    env = clean_env()
    env["CUDA_VISIBLE_DEVICES"] = gpu.uuid
    out = subprocess.run([sys.executable, str(WORKLOAD), "--kinds", "matmul,train",
                          "--warmup", str(warmup), "--seconds", str(seconds)],
                         env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"workload failed ({out.returncode}): {out.stderr[-1500:]}")
    rates = {}
    for line in out.stdout.splitlines():
        row = json.loads(line)
        rates[row["kind"]] = float(row["rate"])
    return rates


class StatusPoller(threading.Thread):
    """Polls a keepgpu supervisor's status every 0.5 s: (t, state, reason, duty_pct)."""

    def __init__(self, k: Keeper) -> None:
        super().__init__(daemon=True)
        self.k = k
        self.rows: list[tuple[float, Any, Any, Any]] = []
        self.done = threading.Event()

    def run(self) -> None:
        assert self.k.sup is not None
        while not self.done.wait(0.5):
            st = self.k.sup.try_status()
            if st and st["gpus"]:
                g = st["gpus"][0]
                self.rows.append((time.monotonic(), g["state"], g["reason"], g.get("duty_pct")))


def run_condition(gpu: Gpu, sampler: Sampler, name: str, settle: float, warmup: float,
                  seconds: float) -> dict[str, Any]:
    tool, opts = CONDITIONS[name]
    k = None
    if tool is not None:
        k = keepgpu(gpu, vram="1GiB", **opts) if tool == "keepgpu" else \
            peer(gpu, vram="1GiB", **opts)
    base_used = gpu.mem_used()
    poller = None
    try:
        if k is not None:
            k.start()
            k.wait_held(base_used, GIB)
            time.sleep(settle)
            if k.sup is not None:
                poller = StatusPoller(k)
                poller.start()
        t0 = time.monotonic()
        rates = run_workload(gpu, warmup, seconds)
        t1 = time.monotonic()
    finally:
        if poller is not None:
            poller.done.set()
        if k is not None:
            k.close()
        wait_idle(gpu, base_used)
    rows = sampler.between(t0, t1)
    util = [r[UTIL] for r in rows if r[UTIL] is not None]
    states = sorted({f"{s}/{r}" if r else s for _, s, r, _ in poller.rows}) if poller else None
    return {
        "label": name, "tool": tool or "none",
        "config": {"keeper_options": opts, "vram": "1GiB" if tool else None, "settle_s": settle,
                   "warmup_s": warmup, "seconds": seconds},
        "metrics": {"matmul_tflops": round(rates["matmul"], 2),
                    "train_steps_per_s": round(rates["train"], 3),
                    "util_mean_during": round(sum(util) / len(util), 1) if util else None,
                    "keeper_states_seen": states},
        "series": series(rows, t0),
    }


def add_interference(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill each keeper's loss vs the alone mean; returns the aims for keepgpu."""
    by = {t["label"]: t["metrics"] for t in tools if "error" not in t}
    if "alone" not in by or "alone-after" not in by:
        return []
    aims = []
    for key in ("matmul_tflops", "train_steps_per_s"):
        ref = (by["alone"][key] + by["alone-after"][key]) / 2
        noise = abs(by["alone"][key] - by["alone-after"][key]) / ref * 100
        for t in tools:
            if "error" in t or t["tool"] == "none":
                continue
            loss = (ref - t["metrics"][key]) / ref * 100
            t["metrics"][f"{key}_loss_pct"] = round(loss, 2)
            t["metrics"][f"{key}_noise_pct"] = round(noise, 2)
            if t["tool"] == "keepgpu":
                aims.append(aim(f"interference of keepgpu on {key}", round(loss, 2), 1.0, "%"))
    return aims


def main() -> None:
    p = arg_parser(__doc__ or "")
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to use")
    args = p.parse_args()
    started = utc_now()
    gpu = preflight("gpu_interference", args.gpu, with_peer=True)
    require_module("gpu_interference", "torch", "the workload needs torch with CUDA")
    sampler = Sampler(gpu, 4.0)
    sampler.start()
    tools = []
    for name in CONDITIONS:
        try:
            tools.append(run_condition(gpu, sampler, name, args.settle, args.warmup,
                                       args.seconds))
        except Exception as exc:  # noqa: BLE001 - record and go on
            log(f"{name}: FAILED: {exc}")
            tools.append({"label": name, "tool": CONDITIONS[name][0] or "none",
                          "config": CONDITIONS[name][1], "error": str(exc)[-2000:],
                          "metrics": {}})
            continue
        m = tools[-1]["metrics"]
        log(f"{name}: matmul {m['matmul_tflops']} TFLOP/s, train {m['train_steps_per_s']} "
            f"steps/s, states {m['keeper_states_seen']}")
    sampler.stop()
    aims = add_interference(tools)
    notes = [
        "loss % = (alone mean - with keeper) / alone mean; noise % = |alone - alone-after| / "
        "alone mean: differences below the noise are not significant",
        f"the workload starts {args.settle:g} s after the keeper holds and is timed after a "
        f"{args.warmup:g} s warm-up (the keeper's reaction time) for {args.seconds:g} s per kind",
    ]
    write_result(args.out, "gpu_interference", "gpu", tools, aims, device=device_info(gpu),
                 notes=notes, started=started)
    if any("error" in t for t in tools):
        raise SystemExit("gpu_interference: some conditions failed (see the result file)")


if __name__ == "__main__":
    main()
