"""`keepgpu-ctl gpus`: the devices this user could hold, read from NVML / AMD SMI (no torch, no
supervisor needed): ordinal (what `--gpus` takes), UUID, name, memory used/total, utilization,
the processes on each (pid, user, memory) and which of this user's keepers holds it.

Ordinals and UUIDs are the ones `keepgpu-supervise --engine ENGINE` would see here (the same
device selection, so *_VISIBLE_DEVICES narrow the list). With `--engine fake` it lists the fake
devices (KEEPGPU_FAKE_GPUS, KEEPGPU_FAKE_MEM_TOTAL), whose only processes are our workers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import click

from keepgpu.cli.common import EXIT_CONFIG, fail
from keepgpu.cli.keepers import Polled, Poller, discover, user_name
from keepgpu.protocol.units import UnitError, format_bytes, parse_size
from keepgpu.supervisor.devices import ConfigError, Visible, visible_devices
from keepgpu.telemetry.base import GpuSample, Telemetry, TelemetryUnavailable

ENGINES = ("auto", "cuda", "rocm", "fake")
GiB = 1024**3
#: Keeper states in which its worker is on the device (or about to be).
_ON_DEVICE = ("starting", "holding", "backoff", "stopping", "unkillable")


@dataclass(frozen=True)
class Holder:
    """A keeper's slot on a device: keeper name, its ordinal there, state, worker pid."""

    name: str
    gpu: int | None
    state: str
    pid: int | None
    held_bytes: int | None
    util_pct: float | None = None


def _holders(polled: list[Polled]) -> dict[str, list[Holder]]:
    """UUID -> the slots of our keepers on that device."""
    out: dict[str, list[Holder]] = {}
    for p in polled:
        for g in (p.status or {}).get("gpus") or []:
            if g.get("uuid") and g.get("state") in _ON_DEVICE:
                out.setdefault(str(g["uuid"]), []).append(Holder(
                    p.keeper.name, g.get("gpu"), str(g.get("state")), g.get("pid"),
                    g.get("held_bytes"), g.get("util_pct")))
    return out


def _fake_total() -> int:
    raw = os.environ.get("KEEPGPU_FAKE_MEM_TOTAL", "80GiB")
    try:
        return parse_size(raw)
    except UnitError as exc:
        fail(EXIT_CONFIG, f"KEEPGPU_FAKE_MEM_TOTAL: {exc}")


def _fake_sample(uuid: str, entry: str, holders: list[Holder]) -> GpuSample:
    """A fake device as the fake engine models it: its processes are our workers on it."""
    from keepgpu.telemetry.base import GpuProcess
    from keepgpu.telemetry.fake import BASELINE_BYTES

    procs = tuple(GpuProcess(pid=h.pid, used_bytes=h.held_bytes, uid=os.getuid())
                  for h in holders if h.pid)
    used = (BASELINE_BYTES + sum(h.held_bytes or 0 for h in holders)) if procs else 0
    utils = [h.util_pct for h in holders if h.util_pct is not None]
    return GpuSample(uuid=uuid, name=f"Fake GPU {entry}", mem_used_bytes=used,
                     mem_total_bytes=_fake_total(), util_pct=max(utils, default=0.0),
                     processes=procs)


def _open(vendor: str, uuid: str) -> Telemetry:
    from keepgpu.telemetry.open import open_telemetry

    return open_telemetry("nvml" if vendor == "nvidia" else "amdsmi", uuid)


def _sample(visible: Visible, i: int, holders: list[Holder]) -> GpuSample:
    uuid = visible.uuids[i]
    if visible.engine == "fake":
        return _fake_sample(uuid or "", visible.entries[i], holders)
    if not uuid:
        return GpuSample(error="UUID unknown until a worker runs on it (index entry without "
                         "CUDA_DEVICE_ORDER=PCI_BUS_ID)")
    try:
        tele = _open(visible.vendor, uuid)
    except TelemetryUnavailable as exc:
        return GpuSample(uuid=uuid, error=str(exc))
    try:
        return tele.sample()
    finally:
        tele.close()


def _device(visible: Visible, i: int, holders: dict[str, list[Holder]]) -> dict[str, Any]:
    """One listed device (the `--json` shape; docs: README, "keepgpu-ctl gpus")."""
    mine = holders.get(visible.uuids[i] or "", [])
    s = _sample(visible, i, mine)
    keeper_of = {h.pid: h.name for h in mine if h.pid}
    procs = [{"pid": p.pid, "user": user_name(p.uid), "uid": p.uid, "used_bytes": p.used_bytes,
              "keeper": keeper_of.get(p.pid)} for p in s.processes or ()]
    return {
        "gpu": i, "entry": visible.entries[i], "uuid": s.uuid or visible.uuids[i],
        "name": s.name, "mem_used_bytes": s.mem_used_bytes,
        "mem_total_bytes": s.mem_total_bytes, "util_pct": s.util_pct,
        "processes": procs if s.processes is not None else None,
        "held_by": [{"name": h.name, "gpu": h.gpu, "state": h.state, "pid": h.pid}
                    for h in mine],
        "error": s.error,
    }


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0f}%"


def render(result: dict[str, Any]) -> str:
    """The text form: one line per device, then one indented line per process on it."""
    rows = [["GPU", "UUID", "NAME", "MEM USED/TOTAL", "UTIL", "HELD BY"]]
    extra: dict[int, list[str]] = {}
    for d in result["devices"]:
        held = ",".join(f"{h['name']}({h['state']})" for h in d["held_by"]) or "-"
        rows.append([str(d["gpu"]), d["uuid"] or "-", d["name"] or "-",
                     f"{format_bytes(d['mem_used_bytes'])}/{format_bytes(d['mem_total_bytes'])}",
                     _pct(d["util_pct"]), held])
        lines = [f"    pid {p['pid']}  {p['user'] or '?'}  {format_bytes(p['used_bytes'])}"
                 + (f"  keeper {p['keeper']}" if p["keeper"] else "")
                 for p in d["processes"] or []]
        if d["error"]:
            lines.append(f"    ({d['error']})")
        extra[len(rows) - 1] = lines
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        out.extend(extra.get(n, []))
    return "\n".join(out)


@click.command(name="gpus")
@click.option("--engine", type=click.Choice(ENGINES), default="auto", envvar="KEEPGPU_ENGINE",
              show_default=True, help="which devices to list (as keepgpu-supervise --engine)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def gpus_command(ctx: click.Context, engine: str, as_json: bool) -> int:
    """Devices this user could hold, their processes and which keeper holds each."""
    try:
        visible = visible_devices(engine)
    except ConfigError as exc:
        fail(EXIT_CONFIG, str(exc))
    timeout = min(float(getattr(ctx.obj, "timeout", 5.0)), 2.0)
    with Poller(timeout) as poller:
        holders = _holders(poller.poll(discover(False)))
    result = {"engine": visible.engine, "vendor": visible.vendor,
              "devices": [_device(visible, i, holders) for i in range(len(visible.entries))]}
    click.echo(json.dumps(result, indent=2) if as_json else render(result))
    return 0
