"""Pure analysis of NVML sample rows (no NVML, no torch): what the GPU benchmarks report."""

from __future__ import annotations

from collections import Counter
from typing import Any

from common import summary

WINDOW_S = 30.0  # reapers scrape every 30 s (Princeton jobstats, Run:ai windows)
DUTY_TOLERANCE = 5.0  # duty mode: window mean within +-5 points of --target-util

# Row layout shared with gpu_common.FIELDS.
T, UTIL, MEM, POWER, SM, PSTATE, TEMP = range(7)


def _vals(rows: list[tuple[Any, ...]], i: int) -> list[float]:
    return [float(r[i]) for r in rows if r[i] is not None]


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 3) if xs else None


def windows(rows: list[tuple[Any, ...]], t0: float, t1: float, size: float = WINDOW_S
            ) -> list[list[tuple[Any, ...]]]:
    """Rows split into consecutive whole windows of `size` seconds from t0 (a partial tail
    window is dropped)."""
    out = []
    start = t0
    while start + size <= t1 + 1e-9:
        out.append([r for r in rows if start <= r[T] < start + size])
        start += size
    return out


def util_metrics(rows: list[tuple[Any, ...]], t0: float, t1: float,
                 target: float | None) -> dict[str, Any]:
    util = _vals(rows, UTIL)
    wins = windows(rows, t0, t1)
    win_means = [_mean(_vals(w, UTIL)) for w in wins]
    nonzero = [any(v > 0 for v in _vals(w, UTIL)) for w in wins]
    out: dict[str, Any] = {
        "mean": _mean(util),
        "min": min(util) if util else None,
        "max": max(util) if util else None,
        "samples": len(util),
        "sample_hz": round(len(rows) / (t1 - t0), 2) if t1 > t0 else None,
        "share_samples_nonzero": round(sum(v > 0 for v in util) / len(util), 3) if util else None,
        "windows_30s": len(wins),
        "window_means": win_means,
        "window_mins": [min(_vals(w, UTIL), default=None) for w in wins],
        "share_windows_nonzero": round(sum(nonzero) / len(wins), 3) if wins else None,
    }
    if target is not None and wins:
        devs = [abs(m - target) for m in win_means if m is not None]
        out["target"] = target
        out["window_max_abs_dev"] = round(max(devs), 2) if devs else None
        out["share_windows_within_5"] = round(
            sum(d <= DUTY_TOLERANCE for d in devs) / len(wins), 3)
    return out


def power_metrics(rows: list[tuple[Any, ...]], energy_w: float | None,
                  baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Sampled and energy-counter mean power, and both above the idle-context baseline."""
    power = _vals(rows, POWER)
    mean = _mean(power)
    base = baseline or {}

    def above(x: float | None, b: float | None) -> float | None:
        return round(x - b, 2) if x is not None and b is not None else None

    return {
        "mean_w": mean,
        "max_w": max(power) if power else None,
        "energy_mean_w": round(energy_w, 2) if energy_w is not None else None,
        "above_baseline_w": above(mean, base.get("mean_w")),
        "energy_above_baseline_w": above(energy_w, base.get("energy_mean_w")),
    }


def clock_metrics(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    sm = _vals(rows, SM)
    states = Counter(f"P{int(r[PSTATE])}" for r in rows if r[PSTATE] is not None)
    total = sum(states.values())
    return {
        "sm_mhz": summary(sm, 1) if sm else None,
        "pstate_share": {k: round(v / total, 3) for k, v in sorted(states.items())},
        "pstate_mode": states.most_common(1)[0][0] if states else None,
        "temp_c_max": max(_vals(rows, TEMP), default=None),
    }


def signal_metrics(rows: list[tuple[Any, ...]], t0: float, t1: float, target: float | None,
                   baseline: dict[str, Any] | None, energy_w: float | None, base_mem: int
                   ) -> dict[str, Any]:
    """Everything gpu_signal reports for one keeper over the window [t0, t1]."""
    win = [r for r in rows if t0 <= r[T] <= t1]
    mem = _vals(win, MEM)
    return {
        "util_pct": util_metrics(win, t0, t1, target),
        "power": power_metrics(win, energy_w, baseline),
        "clocks": clock_metrics(win),
        "mem_above_base_gib": round((sum(mem) / len(mem) - base_mem) / 1024**3, 3)
        if mem else None,
    }


def series(rows: list[tuple[Any, ...]], t_origin: float) -> dict[str, list[Any]]:
    """Columns for plotting, times relative to `t_origin`, compactly rounded."""
    return {
        "t_s": [round(r[T] - t_origin, 2) for r in rows],
        "util_pct": [r[UTIL] for r in rows],
        "power_w": [round(r[POWER], 1) if r[POWER] is not None else None for r in rows],
        "sm_mhz": [r[SM] for r in rows],
        "pstate": [r[PSTATE] for r in rows],
        "mem_used_gib": [round(r[MEM] / 1024**3, 3) if r[MEM] is not None else None
                         for r in rows],
    }
