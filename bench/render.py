"""Render bench/RESULTS.md (tables) and bench/plots/*.png from bench/results/*.json.

  python bench/render.py [--results DIR] [--out-md FILE] [--plots DIR]

Nothing in RESULTS.md is typed by hand: run this after adding result files. For each
(benchmark, machine or GPU) the tools of every result file are merged by label, the newest file
winning. Files from dry runs of the harness (device.dry_run) are ignored. GPU sections say so
when no GPU result exists yet.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import render_plots as plots

BENCH = Path(__file__).resolve().parent
CPU_BENCHES = ("cpu_start", "cpu_restart", "cpu_stop", "cpu_idle", "cpu_rtt", "cpu_metrics")
GPU_BENCHES = ("gpu_signal", "gpu_release", "gpu_start", "gpu_interference")

Run = dict[str, Any]


def load(results: Path) -> list[Run]:
    runs = []
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if (data.get("device") or {}).get("dry_run"):
            continue
        data["_file"] = path.name
        for t in data["tools"]:
            t.setdefault("label", ", ".join(f"{k} {v}" for k, v in (t.get("config") or {}).items()
                                            if k not in ("engine", "reps")))
        runs.append(data)
    return sorted(runs, key=lambda r: r["date"])


def where(run: Run) -> str:
    """The machine a run belongs to: the GPU's name, or the host's CPU for CPU-level runs."""
    if run["level"] == "gpu":
        return str(run["device"]["name"])
    m = run["machine"]
    return f"{m['cpu_model']}, {m['logical_cpus']} CPUs"


def merged(runs: list[Run], bench: str) -> list[Run]:
    """One merged run per machine for `bench`: tools by label, newest file winning."""
    by_where: dict[str, Run] = {}
    for run in (r for r in runs if r["benchmark"] == bench):
        key = where(run)
        cur = by_where.setdefault(key, {**run, "tools": [], "aims": [], "_files": []})
        cur.update({k: v for k, v in run.items() if k not in ("tools", "aims")})
        cur["_files"].append(run["_file"])
        labels = {t.get("label") for t in run["tools"]}
        cur["tools"] = [t for t in cur["tools"] if t.get("label") not in labels] + run["tools"]
        aims = {a["aim"] for a in run["aims"]}
        cur["aims"] = [a for a in cur["aims"] if a["aim"] not in aims] + run["aims"]
    return list(by_where.values())


# ---- formatting -------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{max(1, digits - 2)}f}".rstrip(
            "0").rstrip(".")
    return str(x)


def stat(s: dict[str, Any] | None, keys: tuple[str, ...] = ("p50", "max")) -> str:
    if not s or not s.get("n"):
        return "–"
    return " / ".join(fmt(s.get(k)) for k in keys)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |"
            for r in rows]
    return "\n".join(out)


def m_(t: dict[str, Any], *path: str) -> Any:
    cur: Any = t.get("metrics", {})
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


# ---- CPU tables -------------------------------------------------------------------------------


def t_cpu_start(run: Run) -> str:
    rows = [[t["label"], stat(m_(t, "start_to_all_holding_s"), ("p50", "min", "max")),
             m_(t, "cpu_s_per_worker")] for t in run["tools"]]
    return table(["GPUs (fake)", "start → all holding, s (p50 / min / max)",
                  "CPU s per worker start"], rows)


def t_cpu_restart(run: Run) -> str:
    rows = []
    for t in run["tools"]:
        if "crash_to_holding_s" in t["metrics"]:
            rows.append([t["label"], stat(m_(t, "crash_detect_s")),
                         stat(m_(t, "crash_to_holding_s"))])
        else:
            rows.append([t["label"], stat(m_(t, "hang_detect_s")),
                         stat(m_(t, "hang_to_holding_s"))])
    return table(["fault (GPU 0 of 8)", "detected after, s (p50 / max)",
                  "holding again after, s (p50 / max)"], rows)


def t_cpu_stop(run: Run) -> str:
    rows = [[t["label"], stat(m_(t, "stop_to_exit_s"), ("p50", "min", "max")),
             ",".join(str(c) for c in m_(t, "exit_codes") or []), m_(t, "workers_alive_at_exit")]
            for t in run["tools"]]
    return table(["case", "stop → supervisor exited, s (p50 / min / max)", "exit code",
                  "workers alive at exit"], rows)


def t_cpu_idle(run: Run) -> str:
    rows = [[t["label"], m_(t, "supervisor_cpu_pct_of_one_core"),
             m_(t, "supervisor_rss_mb", "max"), m_(t, "supervisor_uss_mb_end"),
             m_(t, "workers_cpu_pct_of_one_core"), m_(t, "worker_rss_mb_each"),
             m_(t, "host_cpu_busy_pct_all_cores"), m_(t, "restarts_during_window")]
            for t in run["tools"]]
    return table(["workers", "supervisor CPU, % of a core", "supervisor RSS max, MB",
                  "supervisor USS, MB", "all workers CPU, % of a core", "RSS per worker, MB",
                  "host CPU busy, %", "restarts"], rows)


def t_cpu_rtt(run: Run) -> str:
    rows = []
    for t in run["tools"]:
        for key, name in (("status_client_ms", "keepgpu.client.Client (new socket per call)"),
                          ("status_persistent_ms", "persistent DEALER socket"),
                          ("status_client_workers_frozen_ms", "Client, workers SIGSTOPped"),
                          ("status_persistent_workers_frozen_ms",
                           "persistent, workers SIGSTOPped"),
                          ("status_cli_process_ms", "`keepgpu-ctl status --json` process")):
            s = m_(t, key)
            rows.append([f"{t['label']}: {name}", s.get("n"), s.get("p50"), s.get("p99"),
                         s.get("max")])
    extra = ""
    if run["tools"]:
        t0 = run["tools"][0]
        extra = (f"\n\nstatus reply: {m_(t0, 'status_reply_bytes')} bytes; supervisor CPU per "
                 f"status call ≈ {m_(t0, 'supervisor_cpu_ms_per_status_persistent')} ms")
    return table(["way", "calls", "p50 ms", "p99 ms", "max ms"], rows) + extra


def t_cpu_metrics(run: Run) -> str:
    rows = []
    for t in run["tools"]:
        idle, watched = m_(t, "supervisor_cpu_pct_idle") or [], m_(t, "supervisor_cpu_pct_watched")
        extra = m_(t, "supervisor_cpu_pct_extra") or []
        for i, (a, b, c) in enumerate(zip(idle, watched or [], extra, strict=False)):
            rows.append([f"{t['label']}: keeper {i}", a, b, c])
    out = table(["supervisor", "CPU idle, % of a core", "CPU watched, % of a core",
                 "extra, % of a core"], rows)
    lat = []
    for t in run["tools"]:
        for key, name in (("metrics_scrape_ms", "metrics scrape (collector + exposition), ms"),
                          ("top_status_poll_ms", "top's poll (status of every keeper), ms"),
                          ("cli_metrics_process_s", "`keepgpu-ctl metrics` process, s")):
            s = m_(t, key) or {}
            lat.append([f"{t['label']}: {name}", s.get("n"), s.get("p50"), s.get("p99"),
                        s.get("max")])
    t0 = run["tools"][0] if run["tools"] else {}
    return out + "\n\n" + table(["what", "n", "p50", "p99", "max"], lat) + (
        f"\n\nexposition: {m_(t0, 'exposition_bytes')} bytes; keepers answering the CLI: "
        f"{m_(t0, 'cli_metrics_keepers_seen')}")


# ---- GPU tables -------------------------------------------------------------------------------


def t_gpu_signal(run: Run) -> str:
    rows = []
    for t in run["tools"]:
        if "error" in t:
            rows.append([t["label"], "FAILED: " + t["error"][:80].replace("\n", " ")] + [""] * 8)
            continue
        u = m_(t, "util_pct") or {}
        p = m_(t, "power") or {}
        c = m_(t, "clocks") or {}
        wins = u.get("window_means")
        rows.append([
            t["label"], u.get("mean"), u.get("min"),
            " / ".join(fmt(w) for w in wins) if wins else "–",
            u.get("share_windows_nonzero"), p.get("mean_w"),
            p.get("energy_above_baseline_w") if t["tool"] != "baseline" else "(baseline)",
            stat(c.get("sm_mhz"), ("p50",)), c.get("pstate_mode"),
            m_(t, "start_to_holding_s"),
        ])
    return table(["keeper", "util mean %", "util min %", "30-s window means %",
                  "share of 30-s windows non-zero", "power W", "power above idle context W",
                  "SM MHz p50", "P-state", "start → holding s"], rows)


def t_gpu_release(run: Run) -> str:
    rows = []
    for t in run["tools"]:
        if "error" in t:
            rows.append([t["label"], "FAILED: " + t["error"][:80].replace("\n", " "), "", ""])
            continue
        rel = m_(t, "release_s")
        not_freed = m_(t, "not_freed_within_s")
        rows.append([t["label"], f"> {not_freed:g}" if not_freed else stat(rel, ("p50", "max")),
                     stat(m_(t, "exit_s"), ("p50",)), stat(m_(t, "start_to_holding_s"),
                                                           ("p50",))])
    return table(["keeper, hold, stop by", "stop → memory free, s (p50 / max)",
                  "stop → process exited, s", "start → holding, s"], rows)


def t_gpu_start(run: Run) -> str:
    rows = []
    for t in run["tools"]:
        if "error" in t:
            rows.append([t["label"], "FAILED", "", "", "", ""])
            continue
        rows.append([t["label"], stat(m_(t, "start_to_holding_s"), ("p50", "min", "max")),
                     stat(m_(t, "keepgpu_ready_s"), ("p50",)),
                     stat(m_(t, "host_rss_total_mb"), ("p50",)),
                     stat(m_(t, "host_rss_per_gpu_worker_mb"), ("p50",)), m_(t, "threads_main")])
    return table(["keeper", "start → holding (NVML), s (p50 / min / max)", "keepgpu READY, s",
                  "host RSS total, MB", "host RSS per GPU worker, MB", "threads (main)"], rows)


def t_gpu_interference(run: Run) -> str:
    rows = []
    for t in run["tools"]:
        if "error" in t:
            rows.append([t["label"], "FAILED: " + t["error"][:80].replace("\n", " ")] + [""] * 5)
            continue
        rows.append([t["label"], m_(t, "matmul_tflops"), m_(t, "matmul_tflops_loss_pct"),
                     m_(t, "train_steps_per_s"), m_(t, "train_steps_per_s_loss_pct"),
                     m_(t, "util_mean_during"),
                     ", ".join(m_(t, "keeper_states_seen") or []) or "–"])
    noise = next((m_(t, "matmul_tflops_noise_pct") for t in run["tools"]
                  if m_(t, "matmul_tflops_noise_pct") is not None), None)
    noise_t = next((m_(t, "train_steps_per_s_noise_pct") for t in run["tools"]
                    if m_(t, "train_steps_per_s_noise_pct") is not None), None)
    return table(["condition", "bf16 matmul TFLOP/s", "loss %", "training steps/s", "loss %",
                  "NVML util % during", "keepgpu states seen"], rows) + (
        f"\n\nnoise floor (alone vs alone-after): matmul {fmt(noise)} %, training "
        f"{fmt(noise_t)} %")


TABLES: dict[str, Callable[[Run], str]] = {
    "cpu_start": t_cpu_start, "cpu_restart": t_cpu_restart, "cpu_stop": t_cpu_stop,
    "cpu_idle": t_cpu_idle, "cpu_rtt": t_cpu_rtt, "cpu_metrics": t_cpu_metrics,
    "gpu_signal": t_gpu_signal,
    "gpu_release": t_gpu_release, "gpu_start": t_gpu_start,
    "gpu_interference": t_gpu_interference,
}
TITLES = {
    "cpu_start": "Start to all holding", "cpu_restart": "Crash and hang recovery",
    "cpu_stop": "Stop to exit", "cpu_idle": "Supervisor CPU and RSS over 60 s",
    "cpu_rtt": "Control round trip (`status`)",
    "cpu_metrics": "Cost of watching: `metrics` and `top` against 8 keepers x 8 GPUs",
    "gpu_signal": "Signal seen by monitors (NVML)",
    "gpu_release": "Release: stop to memory free (NVML)",
    "gpu_start": "Start to holding and host RSS", "gpu_interference": "Interference",
}


# ---- aims -------------------------------------------------------------------------------------


def duty_power_aim(signal_runs: list[Run]) -> list[dict[str, Any]]:
    """Cross-config aim: does duty mode hold at the least power of any mode and peer?"""
    out = []
    for run in signal_runs:
        power = {t["label"]: m_(t, "power", "energy_above_baseline_w") for t in run["tools"]
                 if "error" not in t and t["tool"] != "baseline"}
        power = {k: v for k, v in power.items() if v is not None}
        duty = {k: v for k, v in power.items() if k.startswith("keepgpu-duty")}
        others = {k: v for k, v in power.items() if k not in duty}
        if not duty or not others:
            continue
        least = min(others, key=lambda k: others[k])
        worst_duty = max(duty, key=lambda k: duty[k])
        out.append({"aim": f"duty modes at the least power of any mode and peer ({worst_duty} "
                    f"{fmt(duty[worst_duty])} W vs least other: {least} {fmt(others[least])} W, "
                    "above idle context)", "limit": others[least], "cmp": "<=",
                    "measured": duty[worst_duty], "unit": "W",
                    "met": duty[worst_duty] <= others[least], "_where": where(run),
                    "_bench": "gpu_signal"})
    return out


def aims_table(groups: dict[str, list[Run]]) -> str:
    rows = []
    for bench in (*CPU_BENCHES, *GPU_BENCHES):
        for run in groups.get(bench, []):
            for a in run["aims"]:
                rows.append([a["aim"], f"{a['cmp']} {fmt(a['limit'])} {a['unit']}",
                             f"{fmt(a['measured'])} {a['unit']}",
                             {True: "**met**", False: "**missed**", None: "not measured"}[
                                 a["met"]], bench, where(run)])
    for a in duty_power_aim(groups.get("gpu_signal", [])):
        rows.append([a["aim"], "least", f"{fmt(a['measured'])} W",
                     "**met**" if a["met"] else "**missed**", a["_bench"], a["_where"]])
    if not rows:
        return "No aims measured yet."
    return table(["aim", "target", "measured", "result", "benchmark", "machine"], rows)


def aims_history(runs: list[Run]) -> str:
    """Every run's aims, oldest first: how the figures moved with keepgpu's commits."""
    rows = []
    for run in runs:
        for a in run["aims"]:
            rows.append([run["date"], run["versions"].get("keepgpu_commit") or "–", a["aim"],
                         f"{fmt(a['measured'])} {a['unit']}",
                         {True: "met", False: "missed", None: "–"}[a["met"]], where(run)])
    if len({r[0] for r in rows}) < 2:
        return ""
    return table(["date", "commit", "aim", "measured", "result", "machine"], rows)


# ---- page -------------------------------------------------------------------------------------


def machine_lines(run: Run) -> str:
    m, v = run["machine"], run["versions"]
    lines = [f"- host: {m['cpu_model']}, {m['logical_cpus']} logical CPUs "
             f"({m.get('physical_cores')} cores), {m['ram_bytes'] / 1024**3:.1f} GiB RAM, "
             f"{m['os']}, kernel {m['kernel']}, Python {m['python']}",
             f"- keepgpu {v['keepgpu']} (commit {v.get('keepgpu_commit') or 'unknown'}), pyzmq "
             f"{v.get('pyzmq')} / libzmq {v.get('libzmq')}, torch {v.get('torch') or '–'}, "
             f"keep-gpu {v.get('keep_gpu') or '–'}"]
    if run["level"] == "gpu":
        d = run["device"]
        lines.append(f"- GPU: {d['name']}, driver {d.get('driver')}, CUDA {d.get('cuda_driver')}"
                     f", {d.get('mem_total_bytes', 0) / 1024**3:.1f} GiB, power limit "
                     f"{fmt(d.get('power_limit_w'))} W")
    else:
        lines.append("- device: none — keepgpu's fake engine (real processes and ZeroMQ, no GPU)")
    lines.append(f"- host CPU busy before the run (other work): "
                 f"{fmt(m.get('host_cpu_busy_pct_before'))} %; date {run['date']}; files: "
                 + ", ".join(f"`results/{f}`" for f in run["_files"]))
    return "\n".join(lines)


def section(bench: str, runs: list[Run], images: dict[str, list[str]]) -> list[str]:
    out = [f"### {TITLES[bench]} (`{bench}`)", ""]
    for run in runs:
        out += [machine_lines(run), "", TABLES[bench](run), ""]
        out += [f"- {n}" for n in run.get("notes", [])]
        out.append("")
    for img in images.get(bench, []):
        out += [f"![{bench}]({img})", ""]
    return out


def page(groups: dict[str, list[Run]], images: dict[str, list[str]], runs: list[Run]) -> str:
    out = ["# keepgpu benchmarks — results", "",
           "<!-- generated by bench/render.py from bench/results/*.json; do not edit by hand -->",
           "", "Generated by `python bench/render.py` from the JSON files in `bench/results/`. "
           "How to run each benchmark: [README.md](README.md).", "", "## Aims", "",
           aims_table(groups), ""]
    history = aims_history(runs)
    if history:
        out += ["Every run, oldest first (the table above shows the newest figures):", "",
                history, ""]
    out += ["## CPU level (fake engine)", ""]
    for bench in CPU_BENCHES:
        if groups.get(bench):
            out += section(bench, groups[bench], images)
        else:
            out += [f"### {TITLES[bench]} (`{bench}`)", "", "Not run yet.", ""]
    out += ["## GPU level, keepgpu vs KeepGPU (keep-gpu 1.0.0)", ""]
    if not any(groups.get(b) for b in GPU_BENCHES):
        out += ["No GPU results yet: no GPU was lent when these results were produced. The "
                "scripts are ready: `bench/run_gpu.sh OUT_DIR` on the device machine (see "
                "README.md), then copy the JSON files into `bench/results/` and re-render.", ""]
    for bench in GPU_BENCHES:
        if groups.get(bench):
            out += section(bench, groups[bench], images)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", type=Path, default=BENCH / "results")
    p.add_argument("--out-md", type=Path, default=BENCH / "RESULTS.md")
    p.add_argument("--plots", type=Path, default=BENCH / "plots")
    args = p.parse_args()
    runs = load(args.results)
    groups = {b: merged(runs, b) for b in (*CPU_BENCHES, *GPU_BENCHES)}
    args.plots.mkdir(parents=True, exist_ok=True)
    for old in args.plots.glob("*.png"):
        old.unlink()
    images = plots.render_all(groups, args.plots)
    rel = {b: [str(Path(i).relative_to(args.out_md.parent)) if Path(i).is_relative_to(
        args.out_md.parent) else str(i) for i in imgs] for b, imgs in images.items()}
    args.out_md.write_text(page(groups, rel, runs), encoding="utf-8")
    print(f"wrote {args.out_md} and {sum(len(v) for v in images.values())} plots in {args.plots}")


if __name__ == "__main__":
    main()
