"""GPU level: start-to-holding on one GPU and host RSS per worker, keepgpu vs KeepGPU.

Each tool is started --reps times holding 1 GiB. start-to-holding = spawn of the command until
NVML shows the 1 GiB in use (for keepgpu also until its READY, i.e. the status says holding).
Host RSS is read 3 s later: keepgpu = supervisor + one worker process per GPU; KeepGPU = one
process with one thread per GPU. Then the keeper is stopped (command / SIGINT).
"""

from __future__ import annotations

import time
from typing import Any

from common import arg_parser, log, summary, utc_now, write_result
from gpu_common import (
    GIB,
    Gpu,
    device_info,
    keepgpu,
    peer,
    preflight,
    wait_idle,
)

TOOLS = ("keepgpu", "KeepGPU")


def one_start(gpu: Gpu, tool: str) -> dict[str, Any]:
    k = keepgpu(gpu, vram="1GiB") if tool == "keepgpu" else peer(gpu, vram="1GiB")
    base_used = gpu.mem_used()
    k.start()
    try:
        hold_s = k.wait_held(base_used, GIB)
        ready_s = k.ready_s()
        time.sleep(3.0)
        rss = k.host_rss()
        k.stop("command")
        k.wait_exit(60)
    finally:
        k.close()
        wait_idle(gpu, base_used)
    return {"hold_s": hold_s, "ready_s": ready_s, "rss": rss}


def run_tool(gpu: Gpu, tool: str, reps: int) -> dict[str, Any]:
    runs = []
    for i in range(reps):
        try:
            runs.append(one_start(gpu, tool))
        except Exception as exc:  # noqa: BLE001 - record and go on with the other tool
            log(f"{tool}: FAILED: {exc}")
            return {"label": tool, "tool": tool, "config": {"vram": "1GiB"},
                    "error": str(exc)[-2000:], "metrics": {}}
        log(f"{tool} rep {i + 1}: holding after {runs[-1]['hold_s']:.3f} s, "
            f"RSS {runs[-1]['rss']['total_mb']} MB")
    ready = [r["ready_s"] for r in runs if r["ready_s"] is not None]
    return {
        "label": tool,
        "tool": tool,
        "config": {"vram": "1GiB", "reps": reps},
        "metrics": {
            "start_to_holding_s": summary(r["hold_s"] for r in runs),
            "keepgpu_ready_s": summary(ready) if ready else None,
            "host_rss_total_mb": summary((r["rss"]["total_mb"] for r in runs), 1),
            "host_rss_main_mb": summary((r["rss"]["main_mb"] for r in runs), 1),
            "host_rss_per_gpu_worker_mb": summary((r["rss"]["per_gpu_worker_mb"] for r in runs),
                                                  1),
            "threads_main": runs[-1]["rss"]["threads_main"],
            "rss_last_run": runs[-1]["rss"],
        },
    }


def main() -> None:
    p = arg_parser(__doc__ or "")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to use")
    args = p.parse_args()
    started = utc_now()
    wanted = [t for t in TOOLS if t in args.tools.split(",")]
    gpu = preflight("gpu_start", args.gpu, "KeepGPU" in wanted)
    tools = [run_tool(gpu, tool, args.reps) for tool in wanted]
    notes = [
        "start_to_holding_s: spawn -> NVML used memory up by >= 97 % of 1 GiB (both tools); "
        "keepgpu_ready_s: spawn -> keepgpu's READY (status holding)",
        "host RSS in MB (10^6 bytes) of the processes on the host, read 3 s after holding",
    ]
    write_result(args.out, "gpu_start", "gpu", tools, [], device=device_info(gpu), notes=notes,
                 started=started)
    if any("error" in t for t in tools):
        raise SystemExit("gpu_start: some tools failed (see the result file)")


if __name__ == "__main__":
    main()
