"""The per-GPU slot state machine of the supervisor: spawning, exits, restarts with backoff,
hang detection and the bounded stop sequence (STOP + SIGTERM, SIGKILL of the process group after
the join timeout, `unkillable` after the kill timeout).

`SlotLifecycle` holds no sockets: the event loop (keepgpu.supervisor.loop) feeds it worker
messages, exits and the clock, and provides `send_to_worker`. Never imports torch.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Callable
from typing import IO, Any

from keepgpu.protocol.runtime import Paths
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
    ) -> None:
        self.config = config
        self.vendor = vendor
        self.paths = paths
        self.clock = clock
        self.worker_stderr = worker_stderr
        self.slots: dict[int, Slot] = {d.gpu: self._new_slot(d) for d in devices}
        self.shutting_down = False
        self._reap_needed = True
        self._dirty = True  # something changed that may move a deadline earlier
        self._next_sweep = clock()

    def send_to_worker(self, slot: Slot, kind: str, **fields: Any) -> bool:
        """Deliver a wire message to the slot's current incarnation (the loop owns the socket)."""
        raise NotImplementedError

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

    def _set_state(self, slot: Slot, state: str, reason: str | None) -> None:
        if slot.state == state and slot.reason == reason:
            return
        self._dirty = True
        slot.state, slot.reason = state, reason
        log.info(
            "gpu=%d pid=%s inc=%d state=%s reason=%s",
            slot.gpu, slot.pid, slot.incarnation, state, reason or "-",
        )

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
        slot.incarnation += 1
        slot.clear_runtime()
        slot.stop = None
        slot.restart_at = None
        slot.unkillable_pid = None
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
            self._set_state(slot, "fatal", "spawn-failed")
            return
        self._set_state(slot, "starting", None)

    def _begin_stop(self, slot: Slot, then: str, now: float) -> None:
        if slot.state == "stopping":
            if slot.stop is not None and then == "stopped":
                slot.stop.then = "stopped"
            return
        if slot.proc is None:
            if slot.state == "restarting":
                slot.restart_at = None
                self._set_state(slot, "stopped", None)
            slot.stop = StopOp(now, then, now, outcome="released", finished=now)
            return
        self.send_to_worker(slot, "stop")
        procs.signal_pid(slot.proc.pid, signal.SIGTERM)
        slot.stop = StopOp(started=now, then=then, join_deadline=now + self.config.join_timeout_s)
        self._set_state(slot, "stopping", "hang" if then == "restart" else None)

    def _reap(self) -> None:
        if not self._reap_needed:
            return
        self._reap_needed = False
        for slot in self.slots.values():
            if slot.proc is not None:
                code = slot.proc.poll()
                if code is not None:
                    self._on_exit(slot, code)

    def _last_words(self, slot: Slot) -> None:
        """Read what the worker sent before it died (its `error` message); the loop overrides."""

    def _on_exit(self, slot: Slot, code: int) -> None:
        if code in LAST_WORDS_CODES and slot.stop is None:
            self._last_words(slot)
        now = self.clock()
        pid = slot.proc.pid if slot.proc else None
        slot.proc = None
        slot.last_exit = procs.describe_exit(code)
        up_for = now - slot.ready_at if slot.ready_at is not None else 0.0
        log.info("gpu=%d pid=%s inc=%d exited %s", slot.gpu, pid, slot.incarnation, slot.last_exit)
        slot.clear_runtime()
        op = slot.stop
        if slot.state == "unkillable":
            slot.unkillable_pid = None
            self._set_state(slot, "stopped", None)
            return
        if op is not None and op.finished is None:
            op.outcome = op.outcome or "released"
            op.finished = now
            if op.then == "stopped":
                self._set_state(slot, "stopped", None)
                return
            self._schedule_restart(slot, now, up_for)
            return
        if code == 78:
            slot.error = slot.error or "worker exited 78 (configuration error)"
            self._set_state(slot, "fatal", "config")
            return
        if slot.state == "starting" and slot.error is None:
            slot.error = f"worker exited {slot.last_exit} before READY"
        self._schedule_restart(slot, now, up_for)

    def _schedule_restart(self, slot: Slot, now: float, up_for: float) -> None:
        if self.shutting_down:
            self._set_state(slot, "stopped", None)
            return
        delay = slot.policy.on_crash(now, up_for)
        if delay is None:
            slot.error = (
                f"gave up after {self.config.max_restarts} restarts within "
                f"{self.config.restart_window_s:g}s; last exit {slot.last_exit}"
            )
            self._set_state(slot, "fatal", "restart-limit")
            return
        slot.restarts += 1
        slot.restart_at = now + delay
        log.info("gpu=%d restart %d in %.2fs", slot.gpu, slot.restarts, delay)
        self._set_state(slot, "restarting", None)

    def _tick(self, now: float) -> None:
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
            self._reap_needed = True
        self._reap()

    def _hung(self, slot: Slot, now: float) -> None:
        log.warning("gpu=%d pid=%s inc=%d %s: dumping its stack and replacing it",
                    slot.gpu, slot.pid, slot.incarnation, slot.error)
        if slot.proc is not None:
            procs.signal_pid(slot.proc.pid, signal.SIGUSR1)
        self._begin_stop(slot, "restart", now)

    def _escalate(self, slot: Slot, op: StopOp, now: float) -> None:
        if slot.proc is None or op.finished is not None:
            return
        if op.kill_deadline is None and now >= op.join_deadline:
            log.warning("gpu=%d pid=%d did not exit within the join timeout: SIGKILL",
                        slot.gpu, slot.proc.pid)
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
            self._set_state(slot, "unkillable", state)

    def _next_deadline(self, now: float) -> float:
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

    def _absorb(self, slot: Slot, msg: dict[str, Any]) -> None:
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

    def _hurry(self) -> None:
        """A second SIGTERM/SIGINT: end the join wait now (the kill timeout still applies)."""
        now = self.clock()
        for slot in self.slots.values():
            if slot.stop is not None and slot.stop.kill_deadline is None:
                slot.stop.join_deadline = min(slot.stop.join_deadline, now)
