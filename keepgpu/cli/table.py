"""Plain-text tables for keepgpu-ctl."""

from __future__ import annotations

import textwrap
from typing import Any

from keepgpu.cli.model import GpuView, duration, human_bytes, parse_status, pct, temp, watts

#: The 80-column table and what `--wide` adds, as `keepgpu-ctl status --help` shows them.
COLUMNS_HELP = """\b
Columns: GPU (ordinal in this keeper), STATE (state and reason: holding, backoff busy|thermal|
pressure|paused, starting, restarting, fatal ...; `keepgpu-ctl explain` says why), HELD (VRAM
the keeper holds), UTIL-OWN (utilization from the keeper's own pulses), OTHERS (other
processes' load, as the keeper judges it), TEMP, POWER, PID (worker), RESTARTS.
--wide adds MEM-USED/TOTAL (whole device), UTIL (whole device), DUTY (share of time in the
keeper's pulses), PSTATE, INC (worker incarnation), LAST-EXIT, HB-AGE (seconds since the last
heartbeat), NAME and UUID. '-' means unknown."""

WIDTH = 80


def _table(rows: list[list[str]], width: int | None = None) -> str:
    """Left-aligned columns two spaces apart; one space apart when that is needed to fit in
    `width` (the worst case of the 80-column table: long reason, 7-digit pid)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    gap = 2
    if width is not None and sum(widths) + gap * (len(widths) - 1) > width:
        gap = 1
    return "\n".join((" " * gap).join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _row(g: GpuView, wide: bool) -> list[str]:
    row = [str(g.gpu), g.label, human_bytes(g.held_bytes), pct(g.own_util_pct),
           pct(g.others_util_pct), temp(g.temp_c), watts(g.power_w), str(g.pid or "-"),
           str(g.restarts if g.restarts is not None else "-")]
    if wide:
        row += [f"{human_bytes(g.mem_used_bytes)}/{human_bytes(g.mem_total_bytes)}",
                pct(g.util_pct), pct(g.duty_pct), g.pstate or "-", str(g.incarnation or "-"),
                g.last_exit or "-", duration(g.heartbeat_age_s), g.name or "-", g.uuid or "-"]
    return row


def render_status(result: dict[str, Any], wide: bool = False) -> str:
    """`keepgpu-ctl status`: a header line, one row per GPU, then one note per GPU error.
    Without `wide` every line fits in 80 columns."""
    k = parse_status(result)
    head = k.header()
    if wide:
        head += f"  version {k.version or '?'}  {k.endpoint or '?'}"
    rows = [["GPU", "STATE", "HELD", "UTIL-OWN", "OTHERS", "TEMP", "POWER", "PID", "RESTARTS"]]
    if wide:
        rows[0] += ["MEM-USED/TOTAL", "UTIL", "DUTY", "PSTATE", "INC", "LAST-EXIT", "HB-AGE",
                    "NAME", "UUID"]
    notes = []
    for g in k.gpus:
        rows.append(_row(g, wide))
        if g.error:
            said = "last exit" in g.error
            last = f" (last: {g.last_exit})" if g.last_exit and not said else ""
            notes.append(f"gpu {g.gpu}: {g.error}{last}")
    width = None if wide else WIDTH
    lines = [head if wide else _fit(head), _table(rows, width)]
    for note in notes:
        lines += [note] if wide else textwrap.wrap(note, WIDTH, subsequent_indent="  ")
    return "\n".join(lines)


def _fit(line: str) -> str:
    return line if len(line) <= WIDTH else line[: WIDTH - 3] + "..."


def render_stop(result: dict[str, Any]) -> str:
    lines = []
    for g in result.get("gpus", []):
        line = f"gpu {g['gpu']}: {g['outcome']} in {g['seconds']:.3f}s"
        if g.get("error"):
            line += f" ({g['error']})"
        lines.append(line)
    if result.get("exiting"):
        gone = result.get("supervisor_exited")
        lines.append("supervisor exited" if gone else "supervisor exiting")
    return "\n".join(lines)
