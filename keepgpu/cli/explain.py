"""`keepgpu-ctl explain [--gpus G]`: per GPU, one sentence saying why it is in its state, with
the numbers behind it, and what would change it.

A client of `status` only (docs/protocol.md: `policy`, `other_processes`, `restarts_in_window`,
`restart_in_s`, `pause_left_s`). Unknown GPU: one line, exit 1 (the supervisor's `not_found`).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from keepgpu.cli.model import (
    GpuView,
    KeeperView,
    OtherProcess,
    duration,
    human_bytes,
    parse_gpu_refs,
    parse_status,
    pct,
    temp,
)

if TYPE_CHECKING:
    from keepgpu.cli.ctl import Ctx

WIDTH = 80


def _n(value: float | None, unit: str = "") -> str:
    """A number as people write it: '10 %', '2 s', '2.5 s'; '?' for unknown."""
    return "?" if value is None else f"{value:g}{unit}"


def _proc(p: OtherProcess) -> str:
    return f"pid {p.pid} ({p.user})"


def _start_hint(g: GpuView) -> str:
    return f"`keepgpu-ctl start --gpus {g.gpu}`"


def _holding(g: GpuView, k: KeeperView) -> str:
    pol = g.policy
    held = human_bytes(g.held_bytes)
    if g.reason == "no-telemetry":
        why = g.telemetry_error or "no reading"
        return (f"holding {held}, but utilization cannot be read ({why}): pulses go on at "
                f"duty {pct(g.duty_pct)} without feedback, and nothing can tell it to back off "
                "for others")
    if g.reason == "pressure-held":
        users = ", ".join(_proc(p) for p in g.others if (p.used_bytes or 0) > 0) or "others"
        rule = ("--on-pressure hold keeps it" if pol and pol.on_pressure == "hold"
                else "it yields only to your own processes")
        return (f"holding {held} although free memory is short: the memory is used by {users}, "
                f"and {rule}")
    line = f"holding {held}"
    if pol and pol.hold_target_bytes is not None and (g.held_bytes or 0) < pol.hold_target_bytes:
        line += f" (growing to {human_bytes(pol.hold_target_bytes)})"
    if pol and pol.mode == "pstate":
        line += f"; pstate mode keeps clocks up with tiny kernels (now {g.pstate or '?'})"
    else:
        target = f" (target {_n(pol.target_util, ' %')})" if pol else ""
        line += (f", duty {_n(g.duty_pct and round(g.duty_pct), ' %')} keeps utilization at "
                 f"{_n(g.util_pct and round(g.util_pct), ' %')}{target}")
    if pol and pol.busy_threshold is not None and pol.busy_threshold < 0:
        return line + "; never backs off for others (busy threshold -1)"
    others = "?" if g.others_util_pct is None else _n(round(g.others_util_pct), " %")
    threshold = _n(pol.busy_threshold, " %") if pol else "the busy threshold"
    return line + f"; others use {others}, it backs off above {threshold}"


def _busy(g: GpuView, pol: Any) -> str:
    threshold = _n(pol.busy_threshold, " %") if pol else "the threshold"
    culprit = max((p for p in g.others if p.util_pct), key=lambda p: p.util_pct or 0.0,
                  default=None)
    if culprit is not None:
        who = f"{_proc(culprit)} uses {_n(round(culprit.util_pct or 0.0), ' %')}"
    else:
        how = "" if g.others else " (judged by a quiet probe: no per-process readings)"
        who = f"other processes use {_n(g.others_util_pct and round(g.others_util_pct), ' %')}"
        who += how
    line = f"backing off: {who} > busy threshold {threshold}"
    clear = _n(pol.busy_clear_s, " s") if pol else "a few seconds"
    line += f"; resumes after {clear} below it"
    if pol and pol.calm_for_s is not None:
        line += f" (below for {_n(pol.calm_for_s, ' s')} now)"
    return line


def _backoff(g: GpuView, k: KeeperView) -> str:
    pol = g.policy
    if g.reason == "busy":
        return _busy(g, pol)
    if g.reason == "thermal":
        limit = _n(pol.max_temp, " °C") if pol else "max temp"
        resume = _n(pol.thermal_resume_c, " °C") if pol else "5 °C below it"
        return f"backing off: {temp(g.temp_c)} > max temp {limit}; resumes at or below {resume}"
    if g.reason == "pressure":
        target = human_bytes(pol.hold_target_bytes) if pol else "?"
        ours = ", ".join(_proc(p) for p in g.others if (p.used_bytes or 0) > 0) or "your process"
        return (f"gave memory back: holds {human_bytes(g.held_bytes)} of the {target} asked "
                f"for, because free memory is short and {ours} needs it; grows back once "
                "memory is free again")
    if g.reason == "paused":
        resume = f"`keepgpu-ctl resume --gpus {g.gpu}`"
        if g.pause_left_s is not None:
            return (f"paused by `keepgpu-ctl pause` (memory kept: {human_bytes(g.held_bytes)}); "
                    f"resumes by itself in {duration(g.pause_left_s)}, or now with {resume}")
        return (f"paused by `keepgpu-ctl pause` (memory kept: {human_bytes(g.held_bytes)}) "
                f"until {resume}")
    return f"backing off ({g.reason or 'no reason given'})"


def _fatal(g: GpuView, k: KeeperView) -> str:
    if g.reason == "restart-limit":
        limit = k.config.get("max_restarts")
        window = k.config.get("restart_window_s")
        crashes = limit + 1 if isinstance(limit, int) else "too many"
        return (f"fatal: {crashes} crashes in {_n(window, ' s')}, last: {g.last_exit or '?'} "
                f"— {_start_hint(g)} retries")
    if g.reason == "config":
        return (f"fatal: configuration error: {g.error or '?'} — fix it, then "
                f"{_start_hint(g)}")
    return f"fatal: {g.error or g.reason or '?'} — {_start_hint(g)} retries"


def _restarting(g: GpuView, k: KeeperView) -> str:
    limit = k.config.get("max_restarts")
    window = k.config.get("restart_window_s")
    why = f": {g.error}" if g.error else ""
    return (f"restarting in {duration(g.restart_in_s)} after {g.last_exit or 'a crash'}{why}; "
            f"{g.restarts_in_window if g.restarts_in_window is not None else '?'} of "
            f"{limit if limit is not None else '?'} restarts used within {_n(window, ' s')}, "
            "one more past that and it turns fatal")


def _starting(g: GpuView, k: KeeperView) -> str:
    timeout = k.config.get("start_timeout_s")
    return (f"starting: worker pid {g.pid or '?'} (incarnation {g.incarnation or '?'}) is "
            f"setting up its device and hold; holding once it reports ready (start timeout "
            f"{_n(timeout, ' s')})")


def _stopping(g: GpuView, k: KeeperView) -> str:
    if g.reason == "hang":
        return f"stopping: {g.error or 'worker hung'}; a new worker starts once it is gone"
    join, kill = k.config.get("join_timeout_s"), k.config.get("kill_timeout_s")
    return (f"stopping: pid {g.pid or '?'} is releasing its memory (SIGKILL after "
            f"{_n(join, ' s')}, given up after {_n(kill, ' s')} more)")


def _stopped(g: GpuView, k: KeeperView) -> str:
    return f"stopped: holds nothing; {_start_hint(g)} holds it again"


def _unkillable(g: GpuView, k: KeeperView) -> str:
    return (f"unkillable: {g.error or f'pid {g.pid} survived SIGKILL'}; its memory stays taken "
            "until the kernel lets the process go (often a stuck driver call)")


def _yielded(g: GpuView, k: KeeperView) -> str:
    pids = ", ".join(str(p) for p in g.yielded_to) or "?"
    many = "s" if len(g.yielded_to) > 1 else ""
    return (f"yielded to pid{many} {pids}: its worker is stopped and its memory free; held "
            f"again once {'they end' if many else 'it ends'}")


_BY_STATE: dict[str, Callable[[GpuView, KeeperView], str]] = {
    "holding": _holding, "backoff": _backoff, "fatal": _fatal, "restarting": _restarting,
    "starting": _starting, "stopping": _stopping, "stopped": _stopped,
    "unkillable": _unkillable, "yielded": _yielded,
}


def explain_gpu(g: GpuView, k: KeeperView) -> str:
    """The sentence for one GPU (without the 'gpu N: ' prefix)."""
    handler = _BY_STATE.get(g.state)
    return handler(g, k) if handler else f"{g.words}"


def render_explain(result: dict[str, Any]) -> str:
    """Header line, then 'gpu N: sentence' per GPU, wrapped to 80 columns."""
    k = parse_status(result)
    lines = [k.header()]
    for g in k.gpus:
        lines += textwrap.wrap(f"gpu {g.gpu}: {explain_gpu(g, k)}", WIDTH,
                               subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(lines)


@click.command()
@click.option("--gpus", default=None, help="ordinals or UUIDs, comma separated")
@click.option("--json", "as_json", is_flag=True,
              help="print [{gpu, state, reason, explanation}] as JSON")
@click.pass_obj
def explain(obj: Ctx, gpus: str | None, as_json: bool) -> int:
    """Why each GPU is in its state, with the numbers, and what would change it."""
    try:
        refs = parse_gpu_refs(gpus)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus") from None
    result = obj.call("status", {"gpus": refs} if refs is not None else None)
    if as_json:
        k = parse_status(result)
        click.echo(json.dumps([{"gpu": g.gpu, "state": g.state, "reason": g.reason,
                                "explanation": explain_gpu(g, k)} for g in k.gpus], indent=2))
    else:
        click.echo(render_explain(result))
    return 0
