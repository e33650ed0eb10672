"""Control command handlers, one function per command; the docstring is the user-facing spec
(docs/protocol.md repeats it). Each returns a result dict, or None when the reply is deferred
(a `stop` answers once release is complete)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from keepgpu.protocol.control import ProtocolError, Request
from keepgpu.protocol.units import parse_vram
from keepgpu.supervisor import watch
from keepgpu.supervisor.slot import LIVE_STATES, Slot

#: States in which `pause`/`set`/`yield` may name a GPU: a worker runs, or the next one is on
#: its way (a yielded GPU's starts when its yields end).
ACCEPTING_STATES = ("starting", *LIVE_STATES, "restarting", "yielded")


class Control(Protocol):
    """What a command handler may see and do (the event loop implements it)."""

    @property
    def slots(self) -> Mapping[int, Slot]: ...
    @property
    def shutting_down(self) -> bool: ...
    @property
    def pid(self) -> int: ...
    @property
    def name(self) -> str: ...

    def clock(self) -> float: ...
    def describe(self, now: float) -> dict[str, Any]: ...
    def start_slot(self, slot: Slot, fresh: bool = False) -> None: ...
    def send_to_worker(self, slot: Slot, kind: str, **fields: Any) -> bool: ...
    def request_stop(
        self, slots: list[Slot], full: bool, envelope: list[bytes] | None, req_id: Any
    ) -> None: ...
    def yield_to(self, slots: list[Slot], pid: int, envelope: list[bytes], req_id: Any
                 ) -> None: ...
    def set_max_hold(self, seconds: float | None) -> dict[str, Any]: ...


Handler = Callable[[Control, Request, list[bytes]], "dict[str, Any] | None"]


def resolve(sup: Control, refs: list[int | str] | None) -> list[Slot]:
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


def cmd_ping(sup: Control, req: Request, env: list[bytes]) -> dict[str, Any]:
    """ping -> {"pong": true, "pid": N, "name": NAME}: is the supervisor answering?"""
    return {"pong": True, "pid": sup.pid, "name": sup.name}


def cmd_status(sup: Control, req: Request, env: list[bytes]) -> dict[str, Any]:
    """status {gpus?} -> {"supervisor": {...}, "gpus": [...]}: state and telemetry per GPU."""
    slots = resolve(sup, req.args.get("gpus"))
    now = sup.clock()
    return {"supervisor": sup.describe(now), "gpus": [s.status(now) for s in slots]}


def cmd_stop(sup: Control, req: Request, env: list[bytes]) -> None:
    """stop {gpus?}: release the named GPUs (all and exit the supervisor when none are named).
    The reply comes when release is complete: per GPU outcome released|killed|unkillable."""
    gpus = req.args.get("gpus")
    slots = resolve(sup, gpus)
    sup.request_stop(slots, full=gpus is None, envelope=env, req_id=req.id)
    return None


def cmd_start(sup: Control, req: Request, env: list[bytes]) -> dict[str, Any]:
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


def _accepting(slot: Slot) -> bool:
    """Does the slot take `pause`/`set` now? A worker runs or its replacement is on the way."""
    if slot.state == "stopping":
        return slot.stop is not None and slot.stop.then in ("restart", "yielded")
    return slot.state in ACCEPTING_STATES


def _targets(sup: Control, req: Request) -> tuple[list[Slot], list[Slot]]:
    """(slots to change, slots skipped). Naming a GPU that is stopped, fatal or unkillable is
    refused (`conflict`), since a change stored for it would surprise at the next `start`;
    without `gpus` such GPUs are skipped and nothing is kept for them."""
    if sup.shutting_down:
        raise ProtocolError("conflict", "the supervisor is stopping")
    refs = req.args.get("gpus")
    slots = resolve(sup, refs)
    if refs is not None:
        for slot in slots:
            if not _accepting(slot):
                raise ProtocolError(
                    "conflict", f"GPU {slot.gpu} is {slot.state}; `start` it first")
    return [s for s in slots if _accepting(s)], [s for s in slots if not _accepting(s)]


def _forward(sup: Control, slots: list[Slot], skipped: list[Slot], msg: str,
             fields: dict[str, Any]) -> dict[str, Any]:
    result = []
    chosen, skip = {s.gpu for s in slots}, {s.gpu for s in skipped}
    for slot in sup.slots.values():
        if slot.gpu in skip:
            result.append({"gpu": slot.gpu, "applied": False, "state": slot.state,
                           "skipped": True})
        elif slot.gpu in chosen:
            if slot.state == "starting":
                slot.changed_while_starting = True  # repeated once it is READY
            live = slot.state in ("starting", *LIVE_STATES)
            sent = live and sup.send_to_worker(slot, msg, **fields)
            result.append({"gpu": slot.gpu, "applied": sent, "state": slot.state})
    return {"gpus": result}


def cmd_pause(sup: Control, req: Request, env: list[bytes]) -> dict[str, Any]:
    """pause {gpus?, seconds?}: stop GPU activity (memory stays held) until `resume` or for
    `seconds`; status shows state backoff, reason paused. Survives worker restarts. Naming a
    stopped or fatal GPU is a `conflict`; without `gpus` those are skipped (not kept)."""
    slots, skipped = _targets(sup, req)
    seconds = req.args.get("seconds")
    until = sup.clock() + seconds if seconds is not None else math.inf
    for slot in slots:
        slot.paused_until = until
    return _forward(sup, slots, skipped, "pause", {"seconds": seconds})


def cmd_resume(sup: Control, req: Request, env: list[bytes]) -> dict[str, Any]:
    """resume {gpus?}: end a pause. Any GPU may be named: it forgets a kept pause."""
    if sup.shutting_down:
        raise ProtocolError("conflict", "the supervisor is stopping")
    named = resolve(sup, req.args.get("gpus"))
    for slot in named:
        slot.paused_until = None
    return _forward(sup, [s for s in named if _accepting(s)],
                    [s for s in named if not _accepting(s)], "resume", {})


def _check_vram(slot: Slot, vram: str | int) -> None:
    """A `set vram` must fit the device; while its total is unknown (first start), wait."""
    want = parse_vram(vram)
    total = slot.telemetry.get("mem_total_bytes") or slot.mem_total_bytes
    if not isinstance(total, int):
        if want.bytes is None:
            return  # a percent always fits; the worker resolves it
        raise ProtocolError(
            "conflict", f"GPU {slot.gpu} is {slot.state}; its total memory is not known yet: "
            "retry once it holds")
    if want.resolve(total) > total:
        raise ProtocolError(
            "invalid_argument", f"vram {want.bytes} bytes exceeds GPU {slot.gpu}'s {total} bytes")


def cmd_set(sup: Control, req: Request, env: list[bytes]) -> dict[str, Any]:
    """set {gpus?, vram?, mode?, target_util?, busy_threshold?, max_temp?, on_pressure?,
    max_hold?}: change settings of running workers without restarting them; kept for later
    restarts. `max_hold` (seconds, or null for none) is the supervisor's: it releases
    everything and exits that long from now; it cannot be combined with `gpus`.
    A `vram` above a GPU's total memory is `invalid_argument`; while the total is not known
    yet (the GPU's first start) a size is `conflict`. Stopped/fatal GPUs as for `pause`."""
    changes = {k: v for k, v in req.args.items() if k not in ("gpus", "max_hold")}
    if "max_hold" in req.args:
        if sup.shutting_down:
            raise ProtocolError("conflict", "the supervisor is stopping")
        held = sup.set_max_hold(req.args["max_hold"])
        if not changes:
            return {"gpus": [], **held}
    slots, skipped = _targets(sup, req)
    if "vram" in changes:
        for slot in slots:
            _check_vram(slot, changes["vram"])
    for slot in slots:
        slot.overrides_before_set = copy.copy(slot.overrides)
        slot.overrides.update(changes)
    return _forward(sup, slots, skipped, "set", changes)


def cmd_yield(sup: Control, req: Request, env: list[bytes]) -> None:
    """yield {gpus?, pid}: free the GPUs (their workers stop: memory released, activity ends)
    while process `pid` lives; the supervisor watches `pid` itself and holds again once it has
    ended, however it ended. Overlapping yields compose (held again after the last). The reply
    comes once the workers have exited, as for `stop`, plus `pid`. A `pid` not running is
    `invalid_argument`; naming a stopped/fatal/unkillable GPU is `conflict` (skipped without
    `gpus`)."""
    pid = req.args["pid"]
    if not watch.exists(pid):
        raise ProtocolError("invalid_argument", f"pid {pid} is not running: nothing to yield to")
    slots, _ = _targets(sup, req)
    if not slots:
        raise ProtocolError("conflict", "no GPU of this supervisor is holding: nothing to yield")
    sup.yield_to(slots, pid, env, req.id)
    return None


COMMANDS: dict[str, Handler] = {
    "ping": cmd_ping,
    "status": cmd_status,
    "stop": cmd_stop,
    "start": cmd_start,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "set": cmd_set,
    "yield": cmd_yield,
}

__all__ = ["COMMANDS", "resolve"]
