"""CPU level: `yield` -> memory free, and CMD end -> holding again (fake engine, 2 and 8 GPUs).

yield_to_free_s: from sending `yield {pid}` until its reply, which the supervisor sends once
every named worker has exited (a fake worker frees its hold on exit: the supervisor side of
"memory free"); at that moment no worker may be alive.
end_to_holding_s: from SIGKILL of the yielded-to process (CMD) until `status` (polled every
10 ms) shows every GPU holding again: the pidfd wake-up plus a fresh worker's start to READY.
Aim (keepgpu issue 12): both <= join timeout (5 s) + 0.5 s.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from common import Supervisor, alive, arg_parser, log, summary, utc_now, wait_quiet, write_result

JOIN_S = 5.0
PLAN = [(2, 5), (8, 5)]  # (gpus, reps)


def one_yield(sup: Supervisor) -> dict[str, Any]:
    workers = [g["pid"] for g in sup.status()["gpus"]]
    cmd = subprocess.Popen(["sleep", "600"])
    try:
        t0 = time.monotonic()
        reply = sup.call("yield", {"pid": cmd.pid}, timeout=30)
        t_free = time.monotonic()
        left = [p for p in workers if alive(p)]
        outcomes = sorted({g["outcome"] for g in reply["gpus"]})
        time.sleep(0.5)
        t_kill = time.monotonic()
        cmd.kill()
        t_hold = sup.wait_for(
            lambda st: all(g["state"] == "holding" for g in st["gpus"]), timeout=60)
    finally:
        if cmd.poll() is None:
            cmd.kill()
        cmd.wait(10)
    return {"free_s": t_free - t0, "hold_s": t_hold - t_kill, "alive": len(left),
            "outcomes": outcomes}


def plan_tool(gpus: int, reps: int) -> dict[str, Any]:
    runs = []
    with Supervisor(gpus, ["--join-timeout", str(JOIN_S)]) as sup:
        sup.wait_ready(timeout=120)
        time.sleep(2.0)  # let the start's CPU burst die down
        for i in range(reps):
            runs.append(one_yield(sup))
            log(f"yield {gpus} rep {i + 1}: free {runs[-1]['free_s']:.3f}s, "
                f"holding again {runs[-1]['hold_s']:.3f}s")
            time.sleep(1.0)
    return {
        "label": f"{gpus} workers, yield",
        "tool": "keepgpu",
        "config": {"engine": "fake", "gpus": gpus, "join_timeout_s": JOIN_S, "reps": reps},
        "metrics": {
            "yield_to_free_s": summary(r["free_s"] for r in runs),
            "end_to_holding_s": summary(r["hold_s"] for r in runs),
            "workers_alive_at_reply": max(r["alive"] for r in runs),
            "outcomes": sorted({o for r in runs for o in r["outcomes"]}),
        },
    }


def main() -> None:
    from common import aim

    args = arg_parser(__doc__ or "").parse_args()
    wait_quiet()
    started = utc_now()
    tools = [plan_tool(*p) for p in PLAN]
    worst_free = max(t["metrics"]["yield_to_free_s"]["max"] for t in tools)
    worst_hold = max(t["metrics"]["end_to_holding_s"]["max"] for t in tools)
    aims = [aim("yield -> memory free (worst run)", round(worst_free, 4), JOIN_S + 0.5, "s"),
            aim("CMD end -> holding again (worst run)", round(worst_hold, 4), JOIN_S + 0.5, "s")]
    notes = ["fake engine: 'memory free' is the supervisor side (every worker exited); on a GPU "
             "the same reply waits for the worker's own release (bench/gpu_release.py)"]
    write_result(args.out, "cpu_yield", "cpu", tools, aims, notes=notes, started=started)


if __name__ == "__main__":
    main()
