"""CPU level: supervisor CPU % and RSS over 60 s with 8 and 64 fake workers, default heartbeat.

Once every GPU holds (+ a settle time), the supervisor process alone is sampled once a second:
CPU = delta of psutil cpu_times (user+system) over wall time, in % of one core; RSS from
memory_info. Nothing talks to the control socket during the window. The workers' total CPU and
RSS are reported for information. A final `status` checks that nothing restarted meanwhile.
"""

from __future__ import annotations

import time
from typing import Any

import psutil
from common import Supervisor, aim, arg_parser, log, summary, utc_now, wait_quiet, write_result

WINDOW_S = 60.0
SETTLE_S = 10.0
MB = 1e6
MIB = 1024**2


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _busy_pct(a: Any, b: Any) -> float:
    """System-wide CPU busy % (all cores together) between two psutil.cpu_times() readings."""
    total = sum(b) - sum(a)
    idle = (b.idle + getattr(b, "iowait", 0.0)) - (a.idle + getattr(a, "iowait", 0.0))
    return 100.0 * (1.0 - idle / total) if total > 0 else float("nan")


def sample_window(sup_proc: psutil.Process, workers: list[psutil.Process], seconds: float
                  ) -> dict[str, list[float]]:
    """Per-second series of supervisor CPU %, RSS bytes, and the workers' totals."""
    series: dict[str, list[float]] = {"t_s": [], "sup_cpu_pct": [], "sup_rss": [],
                                      "workers_cpu_pct": [], "workers_rss": []}
    t0 = last_t = time.monotonic()
    last_sup = _cpu(sup_proc)
    last_w = sum(_cpu(w) for w in workers)
    while last_t - t0 < seconds - 1e-6:
        time.sleep(max(0.0, last_t + 1.0 - time.monotonic()))
        now = time.monotonic()
        sup_c = _cpu(sup_proc)
        w_c = sum(_cpu(w) for w in workers)
        dt = now - last_t
        series["t_s"].append(round(now - t0, 3))
        series["sup_cpu_pct"].append(100.0 * (sup_c - last_sup) / dt)
        series["workers_cpu_pct"].append(100.0 * (w_c - last_w) / dt)
        series["sup_rss"].append(float(sup_proc.memory_info().rss))
        series["workers_rss"].append(float(sum(w.memory_info().rss for w in workers)))
        last_t, last_sup, last_w = now, sup_c, w_c
    return series


def one_idle(gpus: int) -> dict[str, Any]:
    with Supervisor(gpus) as sup:
        sup.wait_ready(timeout=120)
        pids = [g["pid"] for g in sup.status()["gpus"]]
        time.sleep(SETTLE_S)
        sup_proc = psutil.Process(sup.pid)
        workers = [psutil.Process(p) for p in pids]
        cpu0, t0 = _cpu(sup_proc), time.monotonic()
        host0 = psutil.cpu_times()
        series = sample_window(sup_proc, workers, WINDOW_S)
        host_busy = _busy_pct(host0, psutil.cpu_times())
        total_pct = 100.0 * (_cpu(sup_proc) - cpu0) / (time.monotonic() - t0)
        full = sup_proc.memory_full_info()
        st = sup.status()
    restarts = sum(g["restarts"] for g in st["gpus"])
    holding = sum(g["state"] == "holding" for g in st["gpus"])
    w_rss = series["workers_rss"]
    return {
        "label": f"{gpus} workers",
        "tool": "keepgpu",
        "config": {"engine": "fake", "gpus": gpus,
                   "heartbeat_s": st["supervisor"]["config"]["heartbeat_s"],
                   "window_s": WINDOW_S, "settle_s": SETTLE_S},
        "metrics": {
            "supervisor_cpu_pct_of_one_core": round(total_pct, 3),
            "supervisor_cpu_pct_per_second": summary(series["sup_cpu_pct"], 3),
            "supervisor_rss_mb": summary([x / MB for x in series["sup_rss"]], 2),
            "supervisor_uss_mb_end": round(full.uss / MB, 2),
            "supervisor_pss_mb_end": round(getattr(full, "pss", 0) / MB, 2),
            "workers_cpu_pct_of_one_core": round(sum(series["workers_cpu_pct"])
                                                 / len(series["workers_cpu_pct"]), 2),
            "worker_cpu_pct_each": round(sum(series["workers_cpu_pct"])
                                         / len(series["workers_cpu_pct"]) / gpus, 3),
            "workers_rss_mb_total": round(max(w_rss) / MB, 1),
            "worker_rss_mb_each": round(max(w_rss) / MB / gpus, 2),
            "host_cpu_busy_pct_all_cores": round(host_busy, 1),
            "holding_at_end": holding,
            "restarts_during_window": restarts,
        },
        "series": {k: [round(v, 3) if k != "sup_rss" and k != "workers_rss" else round(v / MB, 2)
                       for v in vals] for k, vals in series.items()},
    }


def main() -> None:
    args = arg_parser(__doc__ or "").parse_args()
    wait_quiet()
    started = utc_now()
    tools = []
    for gpus in (8, 64):
        tools.append(one_idle(gpus))
        m = tools[-1]["metrics"]
        log(f"idle {gpus}: supervisor {m['supervisor_cpu_pct_of_one_core']:.3f}% CPU, RSS max "
            f"{m['supervisor_rss_mb']['max']:.1f} MB; workers {m['workers_cpu_pct_of_one_core']}%")
    m64 = tools[-1]["metrics"]
    aims = [
        aim("supervisor CPU with 64 workers (60 s, % of one core)",
            m64["supervisor_cpu_pct_of_one_core"], 1.0, "%"),
        aim("supervisor RSS with 64 workers (max over 60 s)", m64["supervisor_rss_mb"]["max"],
            60.0, "MB"),
    ]
    notes = [
        f"MB = 10^6 bytes (1 MiB = {MIB / MB:.4f} MB); series RSS values are in MB",
        "CPU % is of one core; the workers' figures are for information (fake engine: no device "
        "work, only the keep loop, heartbeats and fake telemetry)",
    ]
    write_result(args.out, "cpu_idle", "cpu", tools, aims, notes=notes, started=started)


if __name__ == "__main__":
    main()
