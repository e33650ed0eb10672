"""Control command handlers, one function per command; the docstring is the user-facing spec
(docs/protocol.md repeats it). Each returns a result dict, or None when the reply is deferred
(a `stop` answers once release is complete)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from keepgpu.protocol.control import ProtocolError, Request
from keepgpu.protocol.units import parse_vram
from keepgpu.supervisor.slot import RUNNING_STATES, Slot

if TYPE_CHECKING:
    from keepgpu.supervisor.loop import Supervisor

Handler = Callable[["Supervisor", Request, list[bytes]], "dict[str, Any] | None"]


def resolve(sup: Supervisor, refs: list[int | str] | None) -> list[Slot]:
    """Slots named by `gpus` refs (ordinal, UUID or device entry); all slots when None."""
    if refs is None:
        return list(sup.slots.values())
    out: list[Slot] = []
    for ref in refs:
        match = [
            s
            for s in sup.slots.values()
            if (isinstance(ref, int) and s.gpu == ref)
            or (isinstance(ref, str) and ref in (s.uuid, s.device_entry, str(s.gpu)))
        ]
        if not match:
            raise ProtocolError("not_found", f"no GPU {ref!r} in this supervisor")
        if match[0] not in out:
            out.append(match[0])
    return out


def cmd_ping(sup: Supervisor, req: Request, env: list[bytes]) -> dict[str, Any]:
    """ping -> {"pong": true, "pid": N, "name": NAME}: is the supervisor answering?"""
    return {"pong": True, "pid": sup.pid, "name": sup.name}


def cmd_status(sup: Supervisor, req: Request, env: list[bytes]) -> dict[str, Any]:
    """status {gpus?} -> {"supervisor": {...}, "gpus": [...]}: state and telemetry per GPU."""
    slots = resolve(sup, req.args.get("gpus"))
    now = sup.clock()
    return {"supervisor": sup.describe(now), "gpus": [s.status(now) for s in slots]}


def cmd_stop(sup: Supervisor, req: Request, env: list[bytes]) -> None:
    """stop {gpus?}: release the named GPUs (all and exit the supervisor when none are named).
    The reply comes when release is complete: per GPU outcome released|killed|unkillable."""
    gpus = req.args.get("gpus")
    slots = resolve(sup, gpus)
    sup.request_stop(slots, full=gpus is None, envelope=env, req_id=req.id)
    return None


def cmd_start(sup: Supervisor, req: Request, env: list[bytes]) -> dict[str, Any]:
    """start {gpus?}: start stopped or fatal GPUs again (all such when none are named), with
    a fresh restart history. Running GPUs are left as they are."""
    if sup.shutting_down:
        raise ProtocolError("conflict", "the supervisor is stopping")
    slots = resolve(sup, req.args.get("gpus"))
    result = []
    for slot in slots:
        if slot.state == "unkillable":
            raise ProtocolError("conflict", f"GPU {slot.gpu}: its last worker is unkillable")
    for slot in slots:
        if slot.state in ("stopped", "fatal", "restarting"):
            sup.start_slot(slot, fresh=True)
            result.append({"gpu": slot.gpu, "result": "started", "incarnation": slot.incarnation})
        else:
            result.append({"gpu": slot.gpu, "result": "already-" + slot.state})
    return {"gpus": result}


def _forward(sup: Supervisor, req: Request, msg: str, fields: dict[str, Any]) -> dict[str, Any]:
    if sup.shutting_down:
        raise ProtocolError("conflict", "the supervisor is stopping")
    slots = resolve(sup, req.args.get("gpus"))
    result = []
    for slot in slots:
        sent = slot.state in RUNNING_STATES and slot.state != "stopping"
        if sent:
            sent = sup.send_to_worker(slot, msg, **fields)
        result.append({"gpu": slot.gpu, "applied": sent, "state": slot.state})
    return {"gpus": result}


def cmd_pause(sup: Supervisor, req: Request, env: list[bytes]) -> dict[str, Any]:
    """pause {gpus?, seconds?}: stop GPU activity (memory stays held) until `resume` or for
    `seconds`; status shows state backoff, reason paused. Survives worker restarts."""
    seconds = req.args.get("seconds")
    until = sup.clock() + seconds if seconds is not None else math.inf
    for slot in resolve(sup, req.args.get("gpus")):
        slot.paused_until = until
    return _forward(sup, req, "pause", {"seconds": seconds})


def cmd_resume(sup: Supervisor, req: Request, env: list[bytes]) -> dict[str, Any]:
    """resume {gpus?}: end a pause."""
    for slot in resolve(sup, req.args.get("gpus")):
        slot.paused_until = None
    return _forward(sup, req, "resume", {})


def cmd_set(sup: Supervisor, req: Request, env: list[bytes]) -> dict[str, Any]:
    """set {gpus?, vram?, mode?, target_util?, busy_threshold?, max_temp?, on_pressure?}:
    change settings of running workers without restarting them; kept for later restarts."""
    changes = {k: v for k, v in req.args.items() if k != "gpus"}
    slots = resolve(sup, req.args.get("gpus"))
    if "vram" in changes:
        want = parse_vram(changes["vram"])
        for slot in slots:
            total = slot.telemetry.get("mem_total_bytes") or slot.mem_total_bytes
            if want.bytes is not None and isinstance(total, int) and want.bytes > total:
                raise ProtocolError(
                    "invalid_argument",
                    f"vram {want.bytes} bytes exceeds GPU {slot.gpu}'s {total} bytes",
                )
    for slot in slots:
        slot.overrides.update(changes)
    return _forward(sup, req, "set", changes)


COMMANDS: dict[str, Handler] = {
    "ping": cmd_ping,
    "status": cmd_status,
    "stop": cmd_stop,
    "start": cmd_start,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "set": cmd_set,
}

__all__ = ["COMMANDS", "resolve"]
