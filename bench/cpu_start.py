"""CPU level: start-to-all-holding of `keepgpu-supervise --engine fake` for 1, 8 and 64 GPUs.

Measured from spawning the supervisor process until its sd_notify READY=1 (sent once every GPU
holds), then checked with a `status` call. Each run ends with a `stop` command.
"""

from __future__ import annotations

import time

import psutil
from common import Supervisor, arg_parser, log, summary, utc_now, wait_quiet, write_result

REPS = {1: 5, 8: 3, 64: 3}


def one_start(gpus: int) -> dict[str, float]:
    with Supervisor(gpus) as sup:
        ready_s = sup.wait_ready(timeout=120)
        cpu_s = start_cpu_seconds(sup.pid)
        st = sup.status()
        t0 = time.monotonic()
        sup.call("stop", timeout=60)
        sup.proc.wait(timeout=30)  # type: ignore[union-attr]
        stop_s = time.monotonic() - t0
    assert len(st["gpus"]) == gpus
    return {"ready_s": ready_s, "stop_s": stop_s, "cpu_s": cpu_s}


def start_cpu_seconds(pid: int) -> float:
    """CPU seconds (user+system) spent so far by the supervisor and all its workers."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def main() -> None:
    args = arg_parser(__doc__ or "").parse_args()
    wait_quiet()
    started = utc_now()
    tools = []
    aims = []
    for gpus, reps in REPS.items():
        runs = []
        for i in range(reps):
            runs.append(one_start(gpus))
            log(f"start {gpus} GPUs rep {i + 1}/{reps}: {runs[-1]['ready_s']:.3f}s to holding")
            time.sleep(1.0)  # let the machine settle between runs
        ready = [r["ready_s"] for r in runs]
        cpu = [r["cpu_s"] for r in runs]
        tools.append({
            "label": f"{gpus} GPU" + ("s" if gpus > 1 else ""),
            "tool": "keepgpu",
            "config": {"engine": "fake", "gpus": gpus, "reps": reps, "defaults": True},
            "metrics": {
                "start_to_all_holding_s": summary(ready),
                "runs_s": [round(x, 4) for x in ready],
                "cpu_s_until_holding": summary(cpu),
                "cpu_s_per_worker": round(sum(cpu) / len(cpu) / gpus, 4),
            },
        })
    notes = [
        "start = spawn of keepgpu-supervise until its sd_notify READY=1 (sent once every GPU is "
        "holding), verified by a status call; one python worker process per fake GPU",
        "KeepGPU (keep-gpu 1.0.0) has no fake device: it is compared at GPU level only",
    ]
    write_result(args.out, "cpu_start", "cpu", tools, aims, notes=notes, started=started)


if __name__ == "__main__":
    main()
