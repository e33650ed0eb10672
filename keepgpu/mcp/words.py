"""A status reply in plain words, for an agent (the MCP `status` and `explain` tools).

Pure functions of the `status` result (docs/protocol.md); unknown telemetry stays "unknown",
never a made-up 0.
"""

from __future__ import annotations

from typing import Any

_GIB = 1024**3
_MIB = 1024**2


def size(n: Any) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool):
        return "unknown"
    return f"{n / _GIB:.1f} GiB" if n >= _GIB else f"{n / _MIB:.0f} MiB"


def pct(x: Any) -> str:
    return "unknown" if not isinstance(x, int | float) or isinstance(x, bool) else f"{x:.0f} %"


def _device(g: dict[str, Any]) -> str:
    label = f"GPU {g.get('gpu')}"
    if g.get("name"):
        label += f" ({g['name']})"
    return label


def line(g: dict[str, Any]) -> str:
    """One short line: the GPU, its state and what it holds."""
    state = str(g.get("state"))
    why = f" ({g['reason']})" if g.get("reason") else ""
    out = f"{_device(g)}: {state}{why}"
    if g.get("held_bytes"):
        out += f", {size(g['held_bytes'])} held"
    if g.get("pid"):
        out += f", worker pid {g['pid']}"
    return out


def summary(status: dict[str, Any]) -> str:
    """A keeper in a few lines: name, pid, then one line per GPU."""
    sup = status.get("supervisor") or {}
    head = (f"keeper {sup.get('name')!r} (pid {sup.get('pid')}, {sup.get('state')}, "
            f"up {sup.get('uptime_s')} s)")
    if sup.get("hold_left_s") is not None:
        head += f", ends in {sup['hold_left_s']:.0f} s (max hold)"
    return "\n".join([head, *(f"  {line(g)}" for g in status.get("gpus") or [])])


def explain_gpu(g: dict[str, Any], config: dict[str, Any]) -> str:
    """Why this GPU is in its state, with the numbers behind it."""
    state, reason = g.get("state"), g.get("reason")
    util = (f"device utilization {pct(g.get('util_pct'))}, the keeper's own share "
            f"{pct(g.get('own_util_pct'))}")
    if state == "holding":
        text = (f"held: {size(g.get('held_bytes'))} of VRAM and light work at about "
                f"{pct(g.get('duty_pct'))} duty (target {pct(config.get('target_util'))}); {util}")
        if reason == "no-telemetry":
            text += (f". No telemetry ({g.get('telemetry_error') or 'unavailable'}): it cannot "
                     "see other processes, so it keeps its duty cycle without backing off")
        elif reason == "pressure-held":
            text += (". Memory is short, but the other process belongs to another user, so the "
                     "keeper keeps its memory")
    elif state == "backoff":
        text = _backoff(g, config, util)
    elif state in ("starting", "restarting"):
        text = (f"{state}: the worker is not holding yet (restarts so far: {g.get('restarts')}, "
                f"last exit: {g.get('last_exit') or 'none'})")
        if g.get("error"):
            text += f"; last error: {g['error']}"
    elif state == "fatal":
        text = (f"given up ({reason}): {g.get('error') or 'no message'}. Nothing is held; the "
                "`keepgpu-ctl start` command revives it")
    elif state == "unkillable":
        text = (f"the worker (pid {g.get('pid')}) did not die even after SIGKILL; its /proc "
                f"state is {reason!r} (usually stuck in the driver)")
    elif state == "stopped":
        text = "released: nothing is held"
    else:
        text = f"{state}" + (f" ({reason})" if reason else "")
    return f"{_device(g)}: {text}."


def _backoff(g: dict[str, Any], config: dict[str, Any], util: str) -> str:
    held = size(g.get("held_bytes"))
    if g.get("reason") == "busy":
        return (f"backing off because another process uses it: others' load "
                f"{pct(g.get('others_util_pct'))}, above the busy threshold "
                f"{pct(config.get('busy_threshold'))}. It keeps {held} but sends no work")
    if g.get("reason") == "thermal":
        return (f"paused for heat: {g.get('temp_c')} °C is above the limit "
                f"{config.get('max_temp')} °C; it resumes 5 °C below. It keeps {held}")
    if g.get("reason") == "pressure":
        return (f"giving memory back: another process of this user needs it; now holding "
                f"{held}, it regrows when memory is free again")
    if g.get("reason") == "paused":
        return f"paused by a command: no work is sent; it keeps {held}"
    return f"backing off ({g.get('reason')}); {util}"


def explain(status: dict[str, Any]) -> str:
    sup = status.get("supervisor") or {}
    config = sup.get("config") or {}
    lines = [summary(status).splitlines()[0]]
    lines += [f"  {explain_gpu(g, config)}" for g in status.get("gpus") or []]
    return "\n".join(lines)
