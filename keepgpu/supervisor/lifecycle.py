"""The per-GPU slot state machine of the supervisor: spawning, exits, restarts with backoff,
hang detection and the bounded stop sequence (STOP + SIGTERM, SIGKILL of the process group after
the join timeout, `unkillable` after the kill timeout).

`SlotLifecycle` holds no sockets: the event loop (keepgpu.supervisor.loop) feeds it worker
messages, exits and the clock, and gives it a `send` callable for messages to workers. Every time
is read from the injected clock, so the whole machine is unit-tested without sleeping
(tests/unit/test_lifecycle_model.py). Never imports torch.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Callable
from typing import IO, Any, Protocol

from keepgpu.logfmt import fields
from keepgpu.protocol.runtime import Paths
from keepgpu.protocol.units import UnitError, format_bytes, parse_vram
from keepgpu.supervisor import procs
from keepgpu.supervisor.config import SupervisorConfig
from keepgpu.supervisor.devices import Device
from keepgpu.supervisor.policy import RestartPolicy
from keepgpu.supervisor.slot import LIVE_STATES, Slot, StopOp

log = logging.getLogger("keepgpu.supervisor")

#: Exit codes after which a worker has sent an `error` message (engine failure, configuration).
LAST_WORDS_CODES = (1, 78)
#: Worst case between a worker's exit and the supervisor noticing it when SIGCHLD was lost.
SWEEP_S = 1.0
#: After the supervisor itself did not run (SIGSTOP, suspend, a frozen cgroup), every live worker
#: gets at least this long (and never more than half its hang timeout) to show a heartbeat:
#: what it sent meanwhile is still on its way through the ZeroMQ I/O thread.
RESUME_GRACE_S = 1.0


class SendFn(Protocol):
    def __call__(self, slot: Slot, kind: str, **fields: Any) -> bool: ...


class SlotLifecycle:
    """Slots and their transitions; one log line per state change (gpu, pid, incarnation)."""

    def __init__(
        self,
        config: SupervisorConfig,
        devices: list[Device],
        vendor: str,
        paths: Paths,
        clock: Callable[[], float],
        worker_stderr: IO[Any] | int | None,
        send: SendFn,
        last_words: Callable[[Slot], None] | None = None,
    ) -> None:
        self.config = config
        self.send = send
        self.last_words = last_words
        self.vendor = vendor
        self.paths = paths
        self.clock = clock
        self.worker_stderr = worker_stderr
        self.slots: dict[int, Slot] = {d.gpu: self._new_slot(d) for d in devices}
        self.shutting_down = False
        self.reap_needed = True
        self.dirty = True  # something changed that may move a deadline earlier
        self._next_sweep = clock()
        self.stalled_s = 0.0  # total time the supervisor itself did not run (seen so far)

    def _new_slot(self, dev: Device) -> Slot:
        c = self.config
        policy = RestartPolicy(
            initial_s=c.restart_delay_s,
            max_s=c.restart_delay_max_s,
            healthy_reset_s=c.healthy_reset_s,
            max_restarts=c.max_restarts,
            window_s=c.restart_window_s,
        )
        return Slot(gpu=dev.gpu, device_entry=dev.entry, uuid=dev.uuid, policy=policy)

    def set_state(self, slot: Slot, state: str, reason: str | None, said: str | None = None,
                  level: int = logging.INFO) -> None:
        """Change the slot's state, in one log line. `said`: what to add that no line has
        said yet (a failure the supervisor found; the worker logs its own errors itself)."""
        if slot.state == state and slot.reason == reason:
            return
        self.dirty = True
        before = slot.state
        slot.state, slot.reason = state, reason
        extra = fields("state", **_who(slot), state=state, reason=reason, previous=before,
                       error=slot.error if state in ("fatal", "unkillable") else None)
        log.log(level, "gpu=%d pid=%s inc=%d state=%s reason=%s%s", slot.gpu, slot.pid or "-",
                slot.incarnation, state, reason or "-", f": {said}" if said else "", extra=extra)

    def _settings_for(self, slot: Slot) -> dict[str, Any]:
        settings = self.config.worker.to_wire()
        settings.update(slot.overrides)
        settings["device_entry"] = slot.device_entry
        settings["uuid"] = slot.uuid  # the worker checks its runtime's view against it
        if slot.paused_until is not None:
            left = slot.paused_until - self.clock()
            if left > 0:
                settings["paused_s"] = None if math.isinf(left) else left
        return settings

    def start_slot(self, slot: Slot, fresh: bool = False) -> None:
        """Spawn a new incarnation of the slot's worker (from the main thread only)."""
        if fresh:
            slot.policy.reset()
        self._drop_unfit_vram(slot)
        slot.incarnation += 1
        slot.clear_runtime()
        slot.stop = None
        slot.restart_at = None
        slot.unkillable_pid = None
        slot.changed_while_starting = False  # the spawn settings carry every change so far
        slot.overrides_before_set = None
        env = procs.worker_env(os.environ, self.vendor, slot.device_entry)
        slot.spawned_at = self.clock()
        try:
            slot.proc = procs.spawn_worker(
                gpu=slot.gpu,
                incarnation=slot.incarnation,
                endpoint=self.paths.workers_endpoint,
                settings=self._settings_for(slot),
                env=env,
                stderr=self.worker_stderr,
            )
        except OSError as exc:
            slot.proc = None
            slot.error = f"cannot start worker: {exc}"
            self.set_state(slot, "fatal", "spawn-failed", said=slot.error)
            return
        self.set_state(slot, "starting", None)

    def _drop_unfit_vram(self, slot: Slot) -> None:
        # A `set vram` override that does not fit the device must not turn every later start
        # into a configuration error (exit 78, fatal): forget it and say so.
        vram = slot.overrides.get("vram")
        total = slot.mem_total_bytes
        if vram is None or total is None:
            return
        try:
            want = parse_vram(vram).resolve(total)
        except UnitError:
            want = total + 1
        if want > total:
            del slot.overrides["vram"]
            log.warning("gpu=%d: dropped the vram override %s: it exceeds the device's %s",
                        slot.gpu, vram, format_bytes(total),
                        extra=fields("override-dropped", gpu=slot.gpu, vram=vram,
                                     mem_total_bytes=total))

    def on_message(self, slot: Slot, msg: dict[str, Any]) -> None:
        """A decoded message from the slot's current incarnation (`ready`, `hb`, `error`)."""
        now = self.clock()
        kind = msg["t"]
        if kind == "error":
            slot.errors_seen += 1
            slot.error = str(msg.get("message", ""))[:1000]
            # The worker logged it itself, with its context: said once, not twice.
            log.debug("gpu=%d pid=%s inc=%d worker error: %s", slot.gpu, slot.pid,
                      slot.incarnation, slot.error,
                      extra=fields("worker-error", **_who(slot), error=slot.error))
            if msg.get("refused") == "set" and slot.overrides_before_set is not None:
                slot.overrides = slot.overrides_before_set  # a refused change is not kept
                slot.overrides_before_set = None
        elif kind == "ready" and slot.state == "starting":
            slot.ready_at = now
            slot.last_hb = now
            self.absorb(slot, msg)
            slot.error = None
            self.set_state(slot, "holding", None)
            self._catch_up(slot)
        elif kind == "hb" and slot.state in LIVE_STATES:
            progress = msg.get("progress")
            if isinstance(progress, int) and progress != slot.hb_progress:
                slot.hb_progress = progress
                slot.last_hb = now
            self.absorb(slot, msg)
            state = msg.get("state")
            if state in LIVE_STATES:
                reason = msg.get("reason")
                # The worker logs this change with the readings behind it.
                self.set_state(slot, state, reason if isinstance(reason, str) else None,
                               level=logging.DEBUG)

    def _catch_up(self, slot: Slot) -> None:
        # `set`/`pause`/`resume` while the worker was starting may not have reached it (it was
        # not connected yet): now that it holds, tell it what it missed.
        if not slot.changed_while_starting:
            return
        slot.changed_while_starting = False
        if slot.overrides:
            self.send(slot, "set", **slot.overrides)
        left = None if slot.paused_until is None else slot.paused_until - self.clock()
        if left is None or left <= 0:
            self.send(slot, "resume")
        else:
            self.send(slot, "pause", seconds=None if math.isinf(left) else left)

    def discount(self, seconds: float) -> None:
        """The supervisor itself did not run for `seconds` (SIGSTOP, Ctrl-Z, `scontrol suspend`,
        a frozen cgroup): that time is no worker's fault. Heartbeat ages, start and stop
        deadlines move later by it, and every live worker gets RESUME_GRACE_S to be heard from
        (its heartbeats queued meanwhile are still being read)."""
        if seconds <= 0:
            return
        self.stalled_s += seconds
        self.dirty = True
        now = self.clock()
        c = self.config
        grace = min(RESUME_GRACE_S, c.hang_timeout_s / 2)
        log.warning("the supervisor did not run for %.1fs: not counted against any worker",
                    seconds, extra=fields("stalled", seconds=round(seconds, 3)))
        for slot in self.slots.values():
            if slot.state == "starting":
                slot.spawned_at += seconds
                slot.spawned_at = max(slot.spawned_at, now - c.start_timeout_s + grace)
            elif slot.state in LIVE_STATES and slot.last_hb is not None:
                slot.last_hb = max(slot.last_hb + seconds, now - c.hang_timeout_s + grace)
            elif slot.state == "stopping" and slot.stop is not None:
                op = slot.stop
                op.join_deadline += seconds
                if op.kill_deadline is not None:
                    op.kill_deadline += seconds

    def begin_stop(self, slot: Slot, then: str, now: float) -> None:
        """Stop the slot's worker; `then`: 'stopped', 'restart' (a hang) or 'yielded' (its
        memory is lent to a watched pid: `yield`; it starts again once those pids end)."""
        if slot.state == "stopping":
            if slot.stop is not None and (then == "stopped" or slot.stop.then == "restart"):
                slot.stop.then = then
            return
        if slot.proc is None:
            if slot.state in ("restarting", "yielded"):
                slot.restart_at = None
                self.set_state(slot, "yielded" if then == "yielded" else "stopped", None)
            if then == "stopped":
                slot.yielded_to.clear()
            slot.stop = StopOp(now, then, now, outcome="released", finished=now)
            return
        self.send(slot, "stop")
        procs.signal_pid(slot.proc.pid, signal.SIGTERM)
        slot.stop = StopOp(started=now, then=then, join_deadline=now + self.config.join_timeout_s)
        reason = {"restart": "hang", "yielded": "yield"}.get(then)
        self.set_state(slot, "stopping", reason)

    def end_yield(self, slot: Slot) -> None:
        """Every pid the slot was yielded to has ended: hold again (a worker still stopping
        for the yield starts again when it exits)."""
        if slot.state == "yielded" and not slot.yielded_to:
            if self.shutting_down:
                self.set_state(slot, "stopped", None)
            else:
                log.info("gpu=%d: every yield ended: holding again", slot.gpu)
                self.start_slot(slot)

    def reap(self) -> None:
        if not self.reap_needed:
            return
        self.reap_needed = False
        for slot in self.slots.values():
            if slot.proc is not None:
                code = slot.proc.poll()
                if code is not None:
                    self._on_exit(slot, code)

    def _on_exit(self, slot: Slot, code: int) -> None:
        if code in LAST_WORDS_CODES and slot.stop is None and self.last_words is not None:
            self.last_words(slot)  # read its `error` message before judging the exit
        now = self.clock()
        pid = slot.proc.pid if slot.proc else None
        slot.proc = None
        slot.last_exit = procs.describe_exit(code)
        up_for = now - slot.ready_at if slot.ready_at is not None else 0.0
        log.info("gpu=%d pid=%s inc=%d exited (%s)", slot.gpu, pid or "-", slot.incarnation,
                 exit_words(slot.last_exit),
                 extra=fields("exit", gpu=slot.gpu, worker_pid=pid, incarnation=slot.incarnation,
                              exit_code=slot.last_exit.get("code"),
                              exit_signal=slot.last_exit.get("signal")))
        slot.clear_runtime()
        op = slot.stop
        if slot.state == "unkillable":
            slot.unkillable_pid = None
            self.set_state(slot, "stopped", None)
            return
        if op is not None and op.finished is None:
            op.outcome = op.outcome or "released"
            op.finished = now
            if op.then == "stopped":
                self.set_state(slot, "stopped", None)
                return
            if op.then == "yielded":
                self.set_state(slot, "yielded", None)
                self.end_yield(slot)  # the pids may all have ended while it stopped
                return
            self._schedule_restart(slot, now, up_for)
            return
        if code == 78:
            said = None if slot.error else "worker exited 78 (configuration error)"
            slot.error = slot.error or said
            self.set_state(slot, "fatal", "config", said=said)
            return
        if slot.state == "starting" and slot.error is None:
            slot.error = f"worker exited ({exit_words(slot.last_exit)}) before READY"
        self._schedule_restart(slot, now, up_for)

    def _schedule_restart(self, slot: Slot, now: float, up_for: float) -> None:
        if self.shutting_down:
            self.set_state(slot, "stopped", None)
            return
        delay = slot.policy.on_crash(now, up_for)
        if delay is None:
            slot.error = (
                f"gave up after {self.config.max_restarts} restarts within "
                f"{self.config.restart_window_s:g}s; last {exit_words(slot.last_exit)}"
            )
            self.set_state(slot, "fatal", "restart-limit", said=slot.error)
            return
        slot.restarts += 1
        slot.restart_at = now + delay
        log.info("gpu=%d restart %d in %.2fs", slot.gpu, slot.restarts, delay,
                 extra=fields("restart", gpu=slot.gpu, restarts=slot.restarts,
                              delay_s=round(delay, 3)))
        self.set_state(slot, "restarting", None)

    def tick(self, now: float) -> None:
        for slot in self.slots.values():
            due = slot.restart_at is not None and now >= slot.restart_at
            if slot.state == "restarting" and due:
                self.start_slot(slot)
            elif slot.state == "starting" and now - slot.spawned_at >= self.config.start_timeout_s:
                slot.error = f"no READY within {self.config.start_timeout_s:g}s"
                self._hung(slot, now)
            elif slot.state in LIVE_STATES and slot.last_hb is not None:
                if now - slot.last_hb >= self.config.hang_timeout_s:
                    slot.error = f"no heartbeat for {now - slot.last_hb:.1f}s"
                    self._hung(slot, now)
            elif slot.state == "stopping" and slot.stop is not None:
                self._escalate(slot, slot.stop, now)
        # SIGCHLD can coalesce; a periodic sweep catches any exit it did not announce.
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_S
            self.reap_needed = True
        self.reap()

    def hang_due(self, now: float) -> bool:
        """Would `tick(now)` judge some worker hung (no READY or no heartbeat in time)?"""
        c = self.config
        for slot in self.slots.values():
            if slot.state == "starting" and now - slot.spawned_at >= c.start_timeout_s:
                return True
            if slot.state in LIVE_STATES and slot.last_hb is not None \
                    and now - slot.last_hb >= c.hang_timeout_s:
                return True
        return False

    def _hung(self, slot: Slot, now: float) -> None:
        log.warning("gpu=%d pid=%s inc=%d %s: dumping its stack and replacing it",
                    slot.gpu, slot.pid or "-", slot.incarnation, slot.error,
                    extra=fields("hang", **_who(slot), error=slot.error))
        if slot.proc is not None:
            procs.signal_pid(slot.proc.pid, signal.SIGUSR1)
        self.begin_stop(slot, "restart", now)

    def _escalate(self, slot: Slot, op: StopOp, now: float) -> None:
        if slot.proc is None or op.finished is not None:
            return
        if op.kill_deadline is None and now >= op.join_deadline:
            log.warning("gpu=%d pid=%d did not exit within the join timeout: SIGKILL",
                        slot.gpu, slot.proc.pid,
                        extra=fields("kill", **_who(slot),
                                     join_timeout_s=self.config.join_timeout_s))
            procs.kill_group(slot.proc.pid)
            op.kill_deadline = now + self.config.kill_timeout_s
            op.outcome = "killed"
        elif op.kill_deadline is not None and now >= op.kill_deadline:
            pid = slot.proc.pid
            state = procs.proc_state(pid)
            slot.error = f"pid {pid} survived SIGKILL for {self.config.kill_timeout_s:g}s " \
                f"(/proc state {state or 'unknown'})"
            op.outcome = "unkillable"
            op.finished = now
            slot.unkillable_pid = pid
            self.set_state(slot, "unkillable", state, said=slot.error)

    def next_deadline(self, now: float) -> float:
        """The earliest moment a slot needs attention (restart, start/hang timeout, escalation)
        or the next exit sweep."""
        c = self.config
        best = self._next_sweep
        for slot in self.slots.values():
            if slot.state == "restarting" and slot.restart_at is not None:
                best = min(best, slot.restart_at)
            elif slot.state == "starting":
                best = min(best, slot.spawned_at + c.start_timeout_s)
            elif slot.state in LIVE_STATES and slot.last_hb is not None:
                best = min(best, slot.last_hb + c.hang_timeout_s)
            elif slot.state == "stopping" and slot.stop is not None:
                op = slot.stop
                best = min(best, op.kill_deadline if op.kill_deadline else op.join_deadline)
                best = min(best, now + 0.05)  # exits are also seen via SIGCHLD; poll soon anyway
        return best

    def absorb(self, slot: Slot, msg: dict[str, Any]) -> None:
        telemetry = msg.get("telemetry")
        if isinstance(telemetry, dict):
            slot.telemetry = telemetry
            if isinstance(telemetry.get("uuid"), str):
                slot.uuid = telemetry["uuid"]
            if isinstance(telemetry.get("name"), str):
                slot.name = telemetry["name"]
        for key in ("uuid", "name"):
            if isinstance(msg.get(key), str):
                setattr(slot, key, msg[key])
        held = msg.get("held_bytes")
        if isinstance(held, int):
            slot.held_bytes = held
        total = msg.get("mem_total_bytes")
        if isinstance(total, int):
            slot.mem_total_bytes = total

    def hurry(self) -> None:
        """A second SIGTERM/SIGINT: end the join wait now (the kill timeout still applies)."""
        now = self.clock()
        for slot in self.slots.values():
            if slot.stop is not None and slot.stop.kill_deadline is None:
                slot.stop.join_deadline = min(slot.stop.join_deadline, now)


def _who(slot: Slot) -> dict[str, Any]:
    """The fields that say which worker a record is about."""
    return {"gpu": slot.gpu, "worker_pid": slot.pid, "incarnation": slot.incarnation}


def exit_words(last_exit: dict[str, Any] | None) -> str:
    """`last_exit` in words: "exit code 3", "killed by SIGKILL"."""
    if not last_exit:
        return "exit unknown"
    if last_exit.get("signal"):
        return f"killed by {last_exit['signal']}"
    return f"exit code {last_exit.get('code')}"
