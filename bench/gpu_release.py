"""GPU level: release — time from the stop until NVML shows the memory free again.

keepgpu vs KeepGPU (keep-gpu 1.0.0), each holding 1 GiB and 50 % of VRAM (the same byte count
for both), stopped `--hold` seconds after NVML shows the hold by:
  command  keepgpu: the `stop` control command; KeepGPU: SIGINT (its documented Ctrl+C)
  sigterm  SIGTERM to the supervisor / to the KeepGPU process
  sigkill  SIGKILL to the supervisor / to the KeepGPU process
"free" = NVML used memory back to what it was before the keeper started (+ 128 MiB), polled
every 2 ms. Start-to-holding and host RSS are recorded for every run too.
"""

from __future__ import annotations

import time
from typing import Any

from common import aim, arg_parser, log, summary, utc_now, write_result
from gpu_common import (
    FREE_SLACK_BYTES,
    GIB,
    Gpu,
    device_info,
    keepgpu,
    peer,
    preflight,
    wait_idle,
    wait_mem,
)

METHODS = ("command", "sigterm", "sigkill")
TOOLS = ("keepgpu", "KeepGPU")
FREE_TIMEOUT_S = 60.0


def one_release(gpu: Gpu, tool: str, vram: int, method: str, hold: float) -> dict[str, Any]:
    k = keepgpu(gpu, vram=vram) if tool == "keepgpu" else peer(gpu, vram=vram)
    base_used = gpu.mem_used()
    k.start()
    try:
        hold_s = k.wait_held(base_used, vram)
        time.sleep(hold)
        rss = k.host_rss()
        t0 = time.monotonic()
        k.stop(method)
        freed = wait_mem(gpu, lambda used: used <= base_used + FREE_SLACK_BYTES, FREE_TIMEOUT_S)
        exited = k.wait_exit(FREE_TIMEOUT_S)
    finally:
        k.close()
        clean = wait_idle(gpu, base_used)
    if not clean:
        raise RuntimeError(f"GPU not idle again after {tool} {method}: {gpu.processes()}")
    return {
        "release_s": round(freed - t0, 4) if freed is not None else None,
        "exit_s": round(exited - t0, 4) if exited is not None else None,
        "start_to_holding_s": round(hold_s, 3),
        "host_rss_total_mb": rss["total_mb"],
    }


def run_case(gpu: Gpu, tool: str, size: str, vram: int, method: str, hold: float, reps: int
             ) -> dict[str, Any]:
    runs = []
    for i in range(reps):
        try:
            runs.append(one_release(gpu, tool, vram, method, hold))
        except Exception as exc:  # noqa: BLE001 - record and go on with the other cases
            log(f"{tool} {size} {method}: FAILED: {exc}")
            return {"label": f"{tool} {size} {method}", "tool": tool,
                    "config": {"vram_bytes": vram, "method": method}, "error": str(exc)[-2000:],
                    "metrics": {}}
        log(f"{tool} {size} {method} rep {i + 1}: free after {runs[-1]['release_s']} s")
    rel = [r["release_s"] for r in runs]
    return {
        "label": f"{tool} {size} {method}",
        "tool": tool,
        "config": {"vram": size, "vram_bytes": vram, "method": method, "hold_s": hold,
                   "reps": reps},
        "metrics": {
            "release_s": summary([r for r in rel if r is not None]) if any(
                r is not None for r in rel) else None,
            "not_freed_within_s": FREE_TIMEOUT_S if None in rel else None,
            "exit_s": summary([r["exit_s"] for r in runs if r["exit_s"] is not None]),
            "start_to_holding_s": summary([r["start_to_holding_s"] for r in runs]),
            "host_rss_total_mb": summary([r["host_rss_total_mb"] for r in runs], 1),
            "runs": runs,
        },
    }


def release_aims(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    aims = []
    for t in tools:
        if t["tool"] != "keepgpu":
            continue
        rel = t["metrics"].get("release_s") if "error" not in t else None
        worst = rel["max"] if rel else None
        if t["metrics"].get("not_freed_within_s"):
            worst = t["metrics"]["not_freed_within_s"]
        aims.append(aim(f"release {t['label']} (worst run)", worst, 1.0, "s"))
    return aims


def main() -> None:
    p = arg_parser(__doc__ or "")
    p.add_argument("--hold", type=float, default=5.0, help="seconds held before the stop")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to use")
    args = p.parse_args()
    started = utc_now()
    tools_wanted = [t for t in TOOLS if t in args.tools.split(",")]
    gpu = preflight("gpu_release", args.gpu, "KeepGPU" in tools_wanted)
    sizes = {"1GiB": GIB, "50%": gpu.mem_total_bytes // 2}
    tools = []
    for tool in tools_wanted:
        for size, vram in sizes.items():
            for method in METHODS:
                tools.append(run_case(gpu, tool, size, vram, method, args.hold, args.reps))
    notes = [
        f"stop sent {args.hold:g} s after NVML showed the hold; 'free' = used memory back to "
        "its level before the keeper (+128 MiB); polled every 2 ms",
        "KeepGPU's command is SIGINT (Ctrl+C, its documented stop for the blocking CLI); "
        "it has no SIGTERM handler (default action: the process dies, the driver frees)",
        f"50% = {sizes['50%']} bytes, passed as a byte count to both tools",
    ]
    write_result(args.out, "gpu_release", "gpu", tools, release_aims(tools),
                 device=device_info(gpu), notes=notes, started=started)
    if any("error" in t for t in tools):
        raise SystemExit("gpu_release: some cases failed (see the result file)")


if __name__ == "__main__":
    main()
