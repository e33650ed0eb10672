"""GPU level: the signal each keeper gives to monitors, read from NVML only.

For keepgpu modes duty (targets 10/30/60), sm, compute, pstate and for KeepGPU (keep-gpu 1.0.0)
with its defaults and with --interval 1, each holding 1 GiB on an otherwise idle GPU: NVML
utilization.gpu sampled at --hz (>= 2) for --seconds (>= 120) after the hold is seen plus a
settle time: mean, min, per-30-s-window means and the share of 30-s windows with a non-zero
sample; power (sampled, and from the energy counter) above the idle-context baseline (a process
that only holds a CUDA context); SM clock and P-state.

  python bench/gpu_signal.py --out DIR [--configs a,b,...] [--seconds 120] [--gpu 0]
"""

from __future__ import annotations

import time
from typing import Any

from common import aim, arg_parser, log, utc_now, write_result
from gpu_common import (
    FREE_SLACK_BYTES,
    GIB,
    Gpu,
    Keeper,
    Sampler,
    device_info,
    idle_context,
    keepgpu,
    peer,
    preflight,
    wait_idle,
    wait_mem,
)
from gpu_metrics import clock_metrics, power_metrics, series, signal_metrics

VRAM = "1GiB"
CONFIGS: dict[str, tuple[str, dict[str, Any], float | None]] = {
    # name: (tool, options, duty target for the +-5 check)
    "keepgpu-duty10": ("keepgpu", {"mode": "duty", "target_util": 10}, 10.0),
    "keepgpu-duty30": ("keepgpu", {"mode": "duty", "target_util": 30}, 30.0),
    "keepgpu-duty60": ("keepgpu", {"mode": "duty", "target_util": 60}, 60.0),
    "keepgpu-sm": ("keepgpu", {"mode": "sm"}, None),
    "keepgpu-compute": ("keepgpu", {"mode": "compute"}, None),
    "keepgpu-pstate": ("keepgpu", {"mode": "pstate"}, None),
    "KeepGPU-default": ("KeepGPU", {}, None),
    "KeepGPU-interval1": ("KeepGPU", {"interval": 1}, None),
}


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def energy_window(gpu: Gpu, t0: float, t1: float) -> float | None:
    """Mean power (W) over [t0, t1] from the energy counter (sleeps until t1)."""
    sleep_until(t0)
    e0, a = gpu.energy_mj(), time.monotonic()
    sleep_until(t1)
    e1, b = gpu.energy_mj(), time.monotonic()
    if e0 is None or e1 is None or b <= a:
        return None
    return (e1 - e0) / 1000.0 / (b - a)


def baseline(gpu: Gpu, sampler: Sampler, seconds: float) -> dict[str, Any]:
    """Power with no process on the GPU, then with an idle CUDA context (the baseline)."""
    idle_used = gpu.mem_used()
    t = time.monotonic()
    sleep_until(t + 5.0)
    no_ctx = power_metrics(sampler.between(t, t + 5.0), None, None)
    proc = idle_context(gpu)
    try:
        t0 = time.monotonic() + 3.0
        energy = energy_window(gpu, t0, t0 + seconds)
        rows = sampler.between(t0, t0 + seconds)
    finally:
        proc.kill()
        proc.wait()
        wait_idle(gpu, idle_used)
    base = power_metrics(rows, energy, None)
    return {
        "label": "baseline: idle CUDA context",
        "tool": "baseline",
        "config": {"seconds": seconds},
        "metrics": {"no_context_power_w": no_ctx["mean_w"], "power": base,
                    "clocks": clock_metrics(rows), "util_pct_mean": None},
    }


def keeper_status(k: Keeper) -> dict[str, Any] | None:
    if k.sup is None:
        return None
    try:
        g = k.sup.status()["gpus"][0]
    except Exception as exc:  # noqa: BLE001 - informational only
        return {"error": str(exc)}
    return {key: g.get(key) for key in ("state", "reason", "duty_pct", "util_pct", "held_bytes")}


def run_config(gpu: Gpu, sampler: Sampler, name: str, base: dict[str, Any], seconds: float,
               settle: float) -> dict[str, Any]:
    tool, opts, target = CONFIGS[name]
    opts = {"vram": VRAM, **opts}
    k = keepgpu(gpu, **opts) if tool == "keepgpu" else peer(gpu, **opts)
    base_used = gpu.mem_used()
    k.start()
    try:
        hold_s = k.wait_held(base_used, GIB)
        ready_s = k.ready_s()
        t0 = k.t_spawn + hold_s + settle
        energy = energy_window(gpu, t0, t0 + seconds)
        t1 = time.monotonic()
        status = keeper_status(k)
        rss = k.host_rss()
        k.stop("command")
        t_stop = time.monotonic()
        freed = wait_mem(gpu, lambda used: used <= base_used + FREE_SLACK_BYTES, 60)
    finally:
        k.close()
        wait_idle(gpu, base_used)
    metrics = signal_metrics(sampler.rows, t0, t1, target, base["metrics"]["power"], energy,
                             base_used)
    metrics.update({
        "start_to_holding_s": round(hold_s, 3),
        "keepgpu_ready_s": round(ready_s, 3) if ready_s is not None else None,
        "release_s": round(freed - t_stop, 3) if freed is not None else None,
        "host_rss": rss,
        "keeper_status": status,
    })
    return {"label": name, "tool": tool, "config": opts, "metrics": metrics,
            "series": series(sampler.between(k.t_spawn, time.monotonic()), k.t_spawn),
            "window_s": [round(t0 - k.t_spawn, 2), round(t1 - k.t_spawn, 2)]}


def duty_aims(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    aims = []
    for t in tools:
        name = t.get("label", "")
        if not name.startswith("keepgpu-duty") or "error" in t:
            continue
        util = t["metrics"]["util_pct"]
        aims.append(aim(f"{name}: every 30-s window mean within +-5 points of target",
                        util.get("window_max_abs_dev"), 5.0, "points"))
    return aims


def main() -> None:
    p = arg_parser(__doc__ or "")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma separated, of: "
                   + ", ".join(CONFIGS))
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--hz", type=float, default=4.0)
    p.add_argument("--baseline-seconds", type=float, default=15.0)
    p.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to use")
    args = p.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    started = utc_now()
    gpu = preflight("gpu_signal", args.gpu, any(CONFIGS[n][0] == "KeepGPU" for n in names))
    sampler = Sampler(gpu, args.hz)
    sampler.start()
    tools = [baseline(gpu, sampler, args.baseline_seconds)]
    log(f"baseline: idle context {tools[0]['metrics']['power']['mean_w']} W")
    for name in names:
        log(f"{name}: starting ({args.seconds:g} s window)")
        try:
            tools.append(run_config(gpu, sampler, name, tools[0], args.seconds, args.settle))
        except Exception as exc:  # noqa: BLE001 - one failing keeper must not lose the others
            log(f"{name}: FAILED: {exc}")
            tools.append({"label": name, "tool": CONFIGS[name][0], "config": CONFIGS[name][1],
                          "error": str(exc)[-2000:], "metrics": {}})
            continue
        m = tools[-1]["metrics"]
        log(f"{name}: util mean {m['util_pct']['mean']} min {m['util_pct']['min']}, power "
            f"+{m['power']['above_baseline_w']} W, windows {m['util_pct']['window_means']}")
    sampler.stop()
    notes = [
        f"every keeper holds {VRAM}; window = hold seen in NVML + {args.settle:g} s settle, then "
        f"{args.seconds:g} s; NVML sampled at {args.hz:g} Hz",
        "power above baseline: minus the mean power of a process holding only an idle CUDA "
        "context on the same GPU, measured first in the same run",
        "KeepGPU is stopped with SIGINT (its Ctrl+C), keepgpu with its stop command",
    ]
    write_result(args.out, "gpu_signal", "gpu", tools, duty_aims(tools), device=device_info(gpu),
                 notes=notes, started=started)
    failed = [t["label"] for t in tools if "error" in t]
    if failed:
        raise SystemExit(f"gpu_signal: configs failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
