"""PNG plots for bench/render.py (matplotlib, Agg). Each function takes one merged run and
returns the paths it wrote."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first

Run = dict[str, Any]
_META = {"Software": None}  # no version stamp: re-rendering the same data gives the same file


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=_META)
    plt.close(fig)
    return path


def _where(run: Run) -> str:
    if run["level"] == "gpu":
        return str(run["device"]["name"])
    return f"{run['machine']['cpu_model']} x{run['machine']['logical_cpus']}"


def cpu_start(run: Run, out: Path) -> list[Path]:
    tools = run["tools"]
    s = [t["metrics"]["start_to_all_holding_s"] for t in tools]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(tools))
    ax.bar(x, [v["p50"] for v in s], color="tab:blue")
    ax.errorbar(x, [v["p50"] for v in s], yerr=[[v["p50"] - v["min"] for v in s],
                                                [v["max"] - v["p50"] for v in s]],
                fmt="none", ecolor="black", capsize=4)
    ax.set_xticks(list(x), [t["label"] for t in tools])
    ax.set_ylabel("seconds (p50, min-max)")
    ax.set_title(f"keepgpu start to all holding (fake engine)\n{_where(run)}", fontsize=9)
    return [_save(fig, out / f"cpu_start-{slug(_where(run))}.png")]


def cpu_idle(run: Run, out: Path) -> list[Path]:
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for t in run["tools"]:
        ser = t.get("series") or {}
        axes[0].plot(ser.get("t_s", []), ser.get("sup_cpu_pct", []), label=t["label"])
        axes[1].plot(ser.get("t_s", []), ser.get("sup_rss", []), label=t["label"])
    axes[0].axhline(1.0, color="red", linestyle="--", linewidth=1, label="aim 1 %")
    axes[1].axhline(60.0, color="red", linestyle="--", linewidth=1, label="aim 60 MB")
    axes[0].set_ylabel("supervisor CPU, % of a core")
    axes[1].set_ylabel("supervisor RSS, MB")
    axes[1].set_xlabel("seconds")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.legend(fontsize=8)
    axes[0].set_title(f"keepgpu supervisor at rest, per second (fake engine)\n{_where(run)}",
                      fontsize=9)
    return [_save(fig, out / f"cpu_idle-{slug(_where(run))}.png")]


def cpu_rtt(run: Run, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in run["tools"]:
        for key, vals in (t.get("series") or {}).items():
            xs = sorted(vals)
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=key)
    ax.axvline(5.0, color="red", linestyle="--", linewidth=1, label="aim p99 5 ms")
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("status round trip, ms (log)")
    ax.set_ylabel("share of calls")
    ax.legend(fontsize=7)
    ax.set_title(f"keepgpu status round trip, 64 fake workers\n{_where(run)}", fontsize=9)
    return [_save(fig, out / f"cpu_rtt-{slug(_where(run))}.png")]


def cpu_stop(run: Run, out: Path) -> list[Path]:
    tools = run["tools"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    y = range(len(tools))
    p50 = [t["metrics"]["stop_to_exit_s"]["p50"] for t in tools]
    mx = [t["metrics"]["stop_to_exit_s"]["max"] for t in tools]
    ax.barh(list(y), p50, color="tab:green", label="p50")
    ax.plot(mx, list(y), "k|", markersize=12, label="max")
    ax.axvline(1.0, color="red", linestyle="--", linewidth=1, label="aim 1 s (64 obedient)")
    ax.set_yticks(list(y), [t["label"] for t in tools], fontsize=8)
    ax.set_xlabel("stop to supervisor exit, s")
    ax.legend(fontsize=8)
    ax.set_title(f"keepgpu stop (fake engine)\n{_where(run)}", fontsize=9)
    return [_save(fig, out / f"cpu_stop-{slug(_where(run))}.png")]


def _signal_axes(ax_u: Any, ax_p: Any, t: dict[str, Any], base_w: float | None) -> None:
    ser = t.get("series") or {}
    ts = ser.get("t_s", [])
    ax_u.plot(ts, ser.get("util_pct", []), color="tab:blue", linewidth=0.8)
    ax_p.plot(ts, ser.get("power_w", []), color="tab:orange", linewidth=0.8)
    win = t.get("window_s")
    for ax in (ax_u, ax_p):
        if win:
            ax.axvspan(win[0], win[1], color="grey", alpha=0.12)
    target = (t.get("config") or {}).get("target_util")
    if target is not None:
        ax_u.axhline(target, color="red", linestyle="--", linewidth=0.8)
    if base_w is not None:
        ax_p.axhline(base_w, color="grey", linestyle=":", linewidth=0.8)
    ax_u.set_ylim(-2, 102)
    ax_u.set_ylabel("util %")
    ax_p.set_ylabel("power W")


def gpu_signal(run: Run, out: Path) -> list[Path]:
    tools = [t for t in run["tools"] if t["tool"] != "baseline" and "error" not in t]
    base = next((t for t in run["tools"] if t["tool"] == "baseline"), None)
    base_w = base["metrics"]["power"]["mean_w"] if base else None
    paths = []
    if tools:
        fig, axes = plt.subplots(len(tools), 2, figsize=(11, 1.9 * len(tools)), squeeze=False,
                                 sharex=True)
        for row, t in zip(axes, tools, strict=True):
            _signal_axes(row[0], row[1], t, base_w)
            row[0].set_title(t["label"], fontsize=8, loc="left")
        axes[-1][0].set_xlabel("seconds since the keeper started")
        axes[-1][1].set_xlabel("seconds since the keeper started")
        fig.suptitle(f"NVML utilization and power per keeper (grey: measured window; dotted: "
                     f"idle-context power)\n{_where(run)}", fontsize=9)
        paths.append(_save(fig, out / f"gpu_signal-overview-{slug(_where(run))}.png"))
    for t in tools:
        fig, (ax_u, ax_p) = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True)
        _signal_axes(ax_u, ax_p, t, base_w)
        ax_p.set_xlabel("seconds since the keeper started")
        ax_u.set_title(f"{t['label']}: NVML utilization and power\n{_where(run)}", fontsize=9)
        paths.append(_save(fig, out / f"gpu_signal-{slug(t['label'])}-{slug(_where(run))}.png"))
    return paths


def gpu_release(run: Run, out: Path) -> list[Path]:
    tools = [t for t in run["tools"] if "error" not in t and t["metrics"].get("release_s")]
    if not tools:
        return []
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(tools) + 1.5))
    y = list(range(len(tools)))
    colors = ["tab:blue" if t["tool"] == "keepgpu" else "tab:grey" for t in tools]
    ax.barh(y, [t["metrics"]["release_s"]["p50"] for t in tools], color=colors)
    ax.axvline(1.0, color="red", linestyle="--", linewidth=1, label="aim 1 s")
    ax.set_xscale("log")
    ax.set_yticks(y, [t["label"] for t in tools], fontsize=8)
    ax.set_xlabel("stop to memory free in NVML, s (log)")
    ax.legend(fontsize=8)
    ax.set_title(f"release: keepgpu (blue) vs KeepGPU (grey)\n{_where(run)}", fontsize=9)
    return [_save(fig, out / f"gpu_release-{slug(_where(run))}.png")]


def gpu_interference(run: Run, out: Path) -> list[Path]:
    tools = [t for t in run["tools"] if "error" not in t and t["tool"] != "none"
             and "matmul_tflops_loss_pct" in t["metrics"]]
    if not tools:
        return []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(tools))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [t["metrics"]["matmul_tflops_loss_pct"] for t in tools], w,
           label="bf16 matmul")
    ax.bar([i + w / 2 for i in x], [t["metrics"]["train_steps_per_s_loss_pct"] for t in tools],
           w, label="training loop")
    ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="aim 1 %")
    ax.set_xticks(list(x), [t["label"] for t in tools], fontsize=8)
    ax.set_ylabel("throughput loss vs alone, %")
    ax.legend(fontsize=8)
    ax.set_title(f"interference on the same GPU\n{_where(run)}", fontsize=9)
    return [_save(fig, out / f"gpu_interference-{slug(_where(run))}.png")]


PLOTS = {"cpu_start": cpu_start, "cpu_idle": cpu_idle, "cpu_rtt": cpu_rtt, "cpu_stop": cpu_stop,
         "gpu_signal": gpu_signal, "gpu_release": gpu_release,
         "gpu_interference": gpu_interference}


def render_all(groups: dict[str, list[Run]], out: Path) -> dict[str, list[str]]:
    images: dict[str, list[str]] = {}
    for bench, fn in PLOTS.items():
        for run in groups.get(bench, []):
            images.setdefault(bench, []).extend(str(p) for p in fn(run, out))
    return images
