"""Plain-text tables for keepgpu-ctl."""

from __future__ import annotations

from typing import Any

from keepgpu.protocol.units import format_bytes


def _num(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{float(value):.{digits}f}{unit}"


def _exit(value: Any) -> str:
    if not isinstance(value, dict):
        return "-"
    if "signal" in value:
        return str(value["signal"])
    return f"code {value.get('code')}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def render_status(result: dict[str, Any]) -> str:
    sup = result.get("supervisor", {})
    head = (
        f"supervisor {sup.get('name')}  pid {sup.get('pid')}  {sup.get('state')}  "
        f"up {_num(sup.get('uptime_s'), 's')}  engine {sup.get('config', {}).get('engine')}  "
        f"{sup.get('endpoint')}"
    )
    rows = [["GPU", "STATE", "REASON", "PID", "INC", "RESTARTS", "HELD", "UTIL", "OWN", "DUTY",
             "MEM USED/TOTAL", "TEMP", "POWER", "PSTATE", "UUID"]]
    notes = []
    for g in result.get("gpus", []):
        mem = f"{format_bytes(g.get('mem_used_bytes'))}/{format_bytes(g.get('mem_total_bytes'))}"
        rows.append([
            str(g.get("gpu")),
            str(g.get("state")),
            g.get("reason") or "-",
            str(g.get("pid") or "-"),
            str(g.get("incarnation")),
            str(g.get("restarts")),
            format_bytes(g.get("held_bytes")),
            _num(g.get("util_pct"), "%"),
            _num(g.get("own_util_pct"), "%"),
            _num(g.get("duty_pct"), "%"),
            mem,
            _num(g.get("temp_c"), "C"),
            _num(g.get("power_w"), "W"),
            g.get("pstate") or "-",
            g.get("uuid") or "-",
        ])
        if g.get("error"):
            last = _exit(g.get("last_exit"))
            notes.append(f"gpu {g.get('gpu')}: {g['error']} (last exit: {last})")
    return "\n".join([head, _table(rows), *notes])


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
