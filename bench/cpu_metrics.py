"""CPU level: what watching costs the keepers. 8 fake-engine keepers x 8 GPUs (64 workers) in
one runtime dir; each supervisor's CPU (psutil user+system, % of one core) over a 60 s window
with nobody watching, then over a 60 s window while, once a second, one `metrics` scrape runs
(keepgpu.cli.metrics.KeeperCollector + prometheus_client.generate_latest: exactly what one
keepgpu-exporter scrape does) and `top`'s polling runs (one `status` per keeper). The extra CPU
per supervisor is the cost of watching. Also: the latency of each scrape (64 GPUs), and the
wall time of a `keepgpu-ctl metrics` process (startup included; as root it also asks every
other user's keepers on the host, counted in the result).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from typing import Any

import psutil
from common import (
    Supervisor,
    aim,
    arg_parser,
    clean_env,
    log,
    short_tmpdir,
    summary,
    utc_now,
    wait_quiet,
    write_result,
)
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from keepgpu.cli.keepers import Poller, keepers_in
from keepgpu.cli.metrics import KeeperCollector, registry_for

KEEPERS = 8
GPUS_EACH = 8
WINDOW_S = 60.0
SETTLE_S = 10.0
CLI_RUNS = 10


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _window(procs: list[psutil.Process], seconds: float, tick: Any = None) -> list[float]:
    """Each process's CPU % of one core over `seconds`; `tick()` runs once a second."""
    c0, t0 = [_cpu(p) for p in procs], time.monotonic()
    next_t = t0
    while time.monotonic() - t0 < seconds:
        if tick is not None:
            tick()
        next_t += 1.0
        time.sleep(max(0.0, next_t - time.monotonic()))
    dt = time.monotonic() - t0
    return [round(100.0 * (_cpu(p) - c) / dt, 3) for p, c in zip(procs, c0, strict=True)]


def _cli_runs(env: dict[str, str]) -> tuple[list[float], int]:
    """Wall seconds of `keepgpu-ctl metrics` processes, and how many keepers they reported."""
    times, seen = [], 0
    for _ in range(CLI_RUNS):
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "keepgpu.cli.ctl", "metrics"], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
        times.append(time.monotonic() - t0)
        fams = {f.name: f for f in text_string_to_metric_families(out.stdout)}
        seen = len(fams["keepgpu_keeper_up"].samples)
    return times, seen


def run() -> dict[str, Any]:
    shared = short_tmpdir("kgm-")
    sups = []
    try:
        for i in range(KEEPERS):
            sup = Supervisor(GPUS_EACH, args=["--vram", "64MiB"], name=f"k{i}")
            sup.env["KEEPGPU_RUNTIME_DIR"] = str(shared)  # one dir: one user's keepers
            sup.endpoint = f"ipc://{shared}/k{i}.ctl"
            sups.append(sup)
            sup.start()
        for sup in sups:
            sup.wait_ready(timeout=300)
        log(f"{KEEPERS} keepers x {GPUS_EACH} GPUs holding; settling {SETTLE_S:g}s")
        time.sleep(SETTLE_S)
        procs = [psutil.Process(s.pid) for s in sups]
        idle = _window(procs, WINDOW_S)
        log(f"idle: supervisor CPU % {idle}")
        collector = KeeperCollector(timeout=5.0, find=lambda: keepers_in(shared))
        registry = registry_for(collector)
        top = Poller(5.0)
        found = keepers_in(shared)
        scrape_ms: list[float] = []
        status_ms: list[float] = []
        sizes: list[int] = []

        def tick() -> None:
            t0 = time.perf_counter()
            sizes.append(len(generate_latest(registry)))
            t1 = time.perf_counter()
            polled = top.poll(found)
            t2 = time.perf_counter()
            assert all(p.status is not None for p in polled), [p.error for p in polled]
            scrape_ms.append(1000 * (t1 - t0))
            status_ms.append(1000 * (t2 - t1))

        watched = _window(procs, WINDOW_S, tick)
        log(f"watched: supervisor CPU % {watched}; scrape ms p50 "
            f"{summary(scrape_ms)['p50']} p99 {summary(scrape_ms)['p99']}")
        collector.close()
        top.close()
        env = clean_env()
        env["KEEPGPU_RUNTIME_DIR"] = str(shared)
        cli_s, cli_keepers = _cli_runs(env)
        restarts = sum(g["restarts"] for s in sups for g in s.status()["gpus"])
    finally:
        for sup in sups:
            sup.close()
        shutil.rmtree(shared, ignore_errors=True)
    extra = [round(w - i, 3) for w, i in zip(watched, idle, strict=True)]
    return {
        "label": f"{KEEPERS} keepers x {GPUS_EACH} GPUs",
        "tool": "keepgpu",
        "config": {"engine": "fake", "keepers": KEEPERS, "gpus_each": GPUS_EACH,
                   "window_s": WINDOW_S, "settle_s": SETTLE_S, "poll_s": 1.0},
        "metrics": {
            "supervisor_cpu_pct_idle": idle,
            "supervisor_cpu_pct_watched": watched,
            "supervisor_cpu_pct_extra": extra,
            "supervisor_cpu_pct_extra_max": max(extra),
            "supervisor_cpu_pct_watched_max": max(watched),
            "metrics_scrape_ms": summary(scrape_ms, 3),
            "top_status_poll_ms": summary(status_ms, 3),
            "exposition_bytes": sizes[-1] if sizes else None,
            "cli_metrics_process_s": summary(cli_s, 3),
            "cli_metrics_keepers_seen": cli_keepers,
            "restarts_during_run": restarts,
        },
    }


def main() -> None:
    args = arg_parser(__doc__ or "").parse_args()
    wait_quiet()
    started = utc_now()
    t = run()
    m = t["metrics"]
    aims = [
        aim("extra supervisor CPU while watched by metrics + top every 1 s (worst of 8 keepers "
            "x 8 GPUs, % of one core)", m["supervisor_cpu_pct_extra_max"], 1.0, "%"),
        aim("metrics scrape for 64 GPUs (8 keepers x 8), p99", m["metrics_scrape_ms"]["p99"],
            50.0, "ms"),
    ]
    notes = [
        "scrape = KeeperCollector.collect (one status per keeper over a kept connection) + "
        "prometheus_client.generate_latest, in the benchmark process: what one keepgpu-exporter "
        "scrape does; top's polling = one status per keeper, over its own kept connections",
        "extra CPU = watched window minus idle window, per supervisor (both 60 s, after a "
        f"{SETTLE_S:g} s settle); CPU % is of one core",
        "keepgpu-ctl metrics process time includes Python start-up and imports; run as root it "
        "also asks every other user's keepers found on the host (cli_metrics_keepers_seen)",
    ]
    write_result(args.out, "cpu_metrics", "cpu", [t], aims, notes=notes, started=started)


if __name__ == "__main__":
    main()
