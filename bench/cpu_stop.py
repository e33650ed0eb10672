"""CPU level: stop-to-exit for 8 and 64 fake workers.

obedient: every worker obeys STOP. stubborn: worker 0 ignores STOP and SIGTERM
(KEEPGPU_FAKE_IGNORE_STOP=0:1), so release waits out --join-timeout (5 s) and SIGKILLs it.
Stop is the `stop` control command (the reply comes once release is complete) or SIGTERM to the
supervisor. Measured: from sending the command / signal until the supervisor process has exited
(and until the reply for the command); at that moment no worker may be alive.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from common import (
    Supervisor,
    alive,
    arg_parser,
    log,
    summary,
    utc_now,
    wait_quiet,
    write_result,
)

PLAN = [  # (gpus, case, method, reps)
    (8, "obedient", "command", 3),
    (8, "obedient", "sigterm", 2),
    (8, "stubborn", "command", 2),
    (64, "obedient", "command", 3),
    (64, "obedient", "sigterm", 2),
    (64, "stubborn", "command", 2),
]


def one_stop(gpus: int, case: str, method: str) -> dict[str, Any]:
    env = {"KEEPGPU_FAKE_IGNORE_STOP": "0:1"} if case == "stubborn" else {}
    with Supervisor(gpus, [], env) as sup:
        sup.wait_ready(timeout=120)
        workers = [g["pid"] for g in sup.status()["gpus"]]
        time.sleep(2.0)  # let the start's CPU burst die down
        reply: dict[str, Any] = {}
        t0 = time.monotonic()
        if method == "command":
            def ask() -> None:
                reply.update(sup.call("stop", timeout=60))
                reply["t"] = time.monotonic()

            th = threading.Thread(target=ask)
            th.start()
        else:
            os.kill(sup.pid, signal.SIGTERM)
        assert sup.proc is not None
        code = sup.proc.wait(timeout=60)
        t_exit = time.monotonic()
        left = [p for p in workers if alive(p)]
        if method == "command":
            th.join(timeout=10)
    outcomes = [g["outcome"] for g in reply.get("gpus", [])]
    return {
        "exit_s": t_exit - t0,
        "reply_s": reply["t"] - t0 if "t" in reply else None,
        "exit_code": code,
        "workers_alive_at_exit": len(left),
        "killed": outcomes.count("killed"),
        "released": outcomes.count("released"),
    }


def plan_tool(gpus: int, case: str, method: str, reps: int) -> dict[str, Any]:
    runs = []
    for i in range(reps):
        runs.append(one_stop(gpus, case, method))
        log(f"stop {gpus} {case} via {method} rep {i + 1}: exit after {runs[-1]['exit_s']:.3f}s"
            f" (code {runs[-1]['exit_code']})")
    replies = [r["reply_s"] for r in runs if r["reply_s"] is not None]
    return {
        "label": f"{gpus} workers, {case}, {method}",
        "tool": "keepgpu",
        "config": {"engine": "fake", "gpus": gpus, "case": case, "method": method,
                   "join_timeout_s": 5.0, "kill_timeout_s": 5.0, "reps": reps},
        "metrics": {
            "stop_to_exit_s": summary(r["exit_s"] for r in runs),
            "stop_to_reply_s": summary(replies) if replies else None,
            "exit_codes": sorted({r["exit_code"] for r in runs}),
            "workers_alive_at_exit": max(r["workers_alive_at_exit"] for r in runs),
            "outcomes_last_run": {"released": runs[-1]["released"], "killed": runs[-1]["killed"]}
            if method == "command" else None,
        },
    }


def main() -> None:
    args = arg_parser(__doc__ or "").parse_args()
    wait_quiet()
    started = utc_now()
    tools = [plan_tool(*p) for p in PLAN]
    worst = max(t["metrics"]["stop_to_exit_s"]["max"] for t in tools
                if t["config"]["gpus"] == 64 and t["config"]["case"] == "obedient")
    aims = [aim_stop(worst)]
    notes = [
        "stop_to_exit_s: command sent (or SIGTERM) -> supervisor process exited (waited on as "
        "our child); every worker is checked dead at that moment",
        "stubborn: worker 0 ignores STOP and SIGTERM; expected ~ --join-timeout (5 s) + SIGKILL",
    ]
    write_result(args.out, "cpu_stop", "cpu", tools, aims, notes=notes, started=started)


def aim_stop(worst: float) -> dict[str, Any]:
    from common import aim

    return aim("stop of 64 obedient workers (worst run, command or SIGTERM)", round(worst, 4),
               1.0, "s")


if __name__ == "__main__":
    main()
