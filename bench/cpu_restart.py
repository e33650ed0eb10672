"""CPU level: crash-to-holding-again and hang detection latency (fake engine, 8 GPUs).

crash: GPU 0's first worker exits with code 3 after 3 s holding (KEEPGPU_FAKE_CRASH_AFTER).
  t_exit = the worker process turns zombie or vanishes (watched in /proc at 1 ms);
  detected = status shows `restarting`; back = status shows `holding` with incarnation 2.
  Run with the default --restart-delay (1 s, ±10 % jitter) and with 0.05 s (supervisor overhead).
hang: GPU 0's first worker stops its keep loop after 2 s holding (KEEPGPU_FAKE_HANG_AFTER):
  alive, no heartbeats, deaf to STOP and SIGTERM. Onset = first `holding` seen + 2 s.
  detected = status shows `stopping` (reason hang); back = holding with incarnation 2.
  Defaults (recorded in the result): --heartbeat 2, --hang-timeout 10, --join-timeout 5
  (then SIGKILL), restart delay 1.
"""

from __future__ import annotations

import time
from typing import Any

from common import (
    Supervisor,
    arg_parser,
    gpu_entry,
    log,
    proc_state,
    summary,
    utc_now,
    wait_quiet,
    write_result,
)

GPUS = 8
CRASH_AFTER_S = 3.0
HANG_AFTER_S = 2.0


def _state_is(gpu: int, state: str, incarnation: int | None = None) -> Any:
    def pred(st: dict[str, Any]) -> bool:
        e = gpu_entry(st, gpu)
        same = incarnation is None or e["incarnation"] == incarnation
        return bool(e["state"] == state and same)

    return pred


def wait_exit(pid: int, timeout: float) -> float:
    """Monotonic time at which `pid` exited (zombie or gone), polled every millisecond."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_state(pid) in (None, "Z", "X"):
            return time.monotonic()
        time.sleep(0.001)
    raise RuntimeError(f"pid {pid} did not exit within {timeout:g}s")


def one_crash(restart_delay: float | None) -> dict[str, float]:
    args = [] if restart_delay is None else ["--restart-delay", str(restart_delay)]
    env = {"KEEPGPU_FAKE_CRASH_AFTER": f"0/1:{CRASH_AFTER_S}"}
    with Supervisor(GPUS, args, env) as sup:
        sup.wait_ready(timeout=60)
        pid = gpu_entry(sup.status(), 0)["pid"]
        t_exit = wait_exit(pid, CRASH_AFTER_S + 10)
        t_detect = sup.wait_for(_state_is(0, "restarting"), 10, poll_s=0.002)
        t_back = sup.wait_for(_state_is(0, "holding", 2), 90, poll_s=0.005)
        others = [g["state"] for g in sup.status()["gpus"] if g["gpu"] != 0]
    assert all(s == "holding" for s in others), others
    return {"detect_s": t_detect - t_exit, "crash_to_holding_s": t_back - t_exit}


def one_hang() -> dict[str, float]:
    env = {"KEEPGPU_FAKE_HANG_AFTER": f"0/1:{HANG_AFTER_S}"}
    with Supervisor(GPUS, [], env) as sup:
        t_ready = sup.wait_for(_state_is(0, "holding", 1), 60, poll_s=0.002)
        onset = t_ready + HANG_AFTER_S
        t_detect = sup.wait_for(_state_is(0, "stopping", 1), 30, poll_s=0.02)
        t_back = sup.wait_for(_state_is(0, "holding", 2), 60, poll_s=0.02)
        entry = gpu_entry(sup.status(), 0)
        dumped = "Stack (most recent call first)" in sup.log_tail(400) or \
            "most recent call first" in sup.log_tail(400)
    return {
        "detect_s": t_detect - onset,
        "hang_to_holding_s": t_back - onset,
        "restarts": entry["restarts"],
        "stack_dumped": dumped,
    }


def crash_tool(restart_delay: float | None, reps: int) -> dict[str, Any]:
    runs = []
    for i in range(reps):
        runs.append(one_crash(restart_delay))
        log(f"crash (restart delay {restart_delay or 'default'}) rep {i + 1}: "
            f"{runs[-1]['crash_to_holding_s']:.3f}s")
    delay = restart_delay if restart_delay is not None else 1.0
    return {
        "label": f"crash, restart delay {delay:g} s" + (" (default)" if restart_delay is None
                                                         else ""),
        "tool": "keepgpu",
        "config": {"engine": "fake", "gpus": GPUS, "fault": f"crash after {CRASH_AFTER_S}s",
                   "restart_delay_s": delay,
                   "reps": reps},
        "metrics": {
            "crash_detect_s": summary(r["detect_s"] for r in runs),
            "crash_to_holding_s": summary(r["crash_to_holding_s"] for r in runs),
        },
    }


def hang_tool(reps: int) -> dict[str, Any]:
    runs = []
    for i in range(reps):
        runs.append(one_hang())
        log(f"hang rep {i + 1}: detected {runs[-1]['detect_s']:.3f}s after onset, "
            f"holding again after {runs[-1]['hang_to_holding_s']:.3f}s")
    return {
        "label": "hang (defaults)",
        "tool": "keepgpu",
        "config": {"engine": "fake", "gpus": GPUS, "fault": f"hang after {HANG_AFTER_S}s",
                   **_defaults(), "reps": reps},
        "metrics": {
            "hang_detect_s": summary(r["detect_s"] for r in runs),
            "hang_to_holding_s": summary(r["hang_to_holding_s"] for r in runs),
            "stack_dumped": all(r["stack_dumped"] for r in runs),
        },
    }


def _defaults() -> dict[str, float]:
    """The supervisor's own defaults (the benchmark runs with them), read from keepgpu."""
    from keepgpu.supervisor.config import SupervisorConfig, WorkerSettings

    c = SupervisorConfig()
    return {"heartbeat_s": WorkerSettings().heartbeat_s, "hang_timeout_s": c.hang_timeout_s,
            "join_timeout_s": c.join_timeout_s, "restart_delay_s": c.restart_delay_s}


def main() -> None:
    args = arg_parser(__doc__ or "").parse_args()
    wait_quiet()
    started = utc_now()
    tools = [crash_tool(None, 3), crash_tool(0.05, 3), hang_tool(2)]
    notes = [
        "crash_detect_s: worker exit -> status shows restarting; crash_to_holding_s: worker "
        "exit -> holding again (includes the restart delay and the new worker's start)",
        "hang_detect_s: hang onset (first holding seen + 2 s) -> status shows stopping/hang; "
        "expected in [hang_timeout - heartbeat, hang_timeout] with the defaults recorded",
        "hang_to_holding_s adds the stop sequence: the hung worker ignores STOP and SIGTERM, "
        "so it is SIGKILLed after --join-timeout (5 s), then restarted after 1 s",
    ]
    write_result(args.out, "cpu_restart", "cpu", tools, [], notes=notes, started=started)


if __name__ == "__main__":
    main()
