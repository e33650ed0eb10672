"""The supervisor: one single-threaded ZeroMQ event loop over the workers socket, the control
socket, the ZAP socket and a self-pipe for signals. Never imports torch or keepgpu.worker."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import zmq

from keepgpu._version import __version__
from keepgpu.logfmt import fields
from keepgpu.protocol import wire
from keepgpu.protocol.control import ProtocolError, error_reply, ok_reply, parse_request
from keepgpu.protocol.runtime import Paths
from keepgpu.supervisor import procs, zap
from keepgpu.supervisor.command import Command
from keepgpu.supervisor.commands import COMMANDS
from keepgpu.supervisor.config import SupervisorConfig
from keepgpu.supervisor.devices import Device
from keepgpu.supervisor.gate import Gate
from keepgpu.supervisor.lifecycle import SlotLifecycle
from keepgpu.supervisor.notify import Notifier
from keepgpu.supervisor.slot import DONE_STATES, LIVE_STATES, Slot
from keepgpu.supervisor.watch import PidWatch
from keepgpu.supervisor.yields import Yields

log = logging.getLogger("keepgpu.supervisor")

# Hard cap enforced by libzmq (the peer is disconnected); requests between 64 KiB and this get
# a bad_request reply instead.
_HARD_MAX_MSG = 1024 * 1024
_HANDLED_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_MAX_POLL_S = 5.0
_HB_BATCH_S = 0.1
_LAST_WORDS_S = 0.2
# An iteration that ends this much later than its poll timeout allowed means the supervisor
# itself was not running (stopped, suspended, starved); generous, as a loaded node can be slow.
_STALL_SLACK_S = 0.5
# Before a hang verdict, queued heartbeats get this long to come out of the ZeroMQ I/O thread.
_LAST_CHANCE_S = 0.05


@dataclass
class PendingStop:
    envelope: list[bytes]
    req_id: Any
    gpus: list[int]
    started: float
    yield_pid: int | None = None  # a `yield`'s reply (memory free), not a `stop`'s


class Supervisor:
    """The event loop: sockets, signals, control commands, completion of stops. The slots and
    their transitions live in `self.life` (a SlotLifecycle); control commands see this object
    through the narrow commands.Control protocol."""

    def __init__(
        self,
        config: SupervisorConfig,
        devices: list[Device],
        vendor: str,
        paths: Paths,
        clock: Callable[[], float] = time.monotonic,
        worker_stderr: IO[Any] | int | None = None,
    ) -> None:
        self.config = config
        self.paths = paths
        self.clock = clock
        self.life = SlotLifecycle(config, devices, vendor, paths, clock, worker_stderr,
                                  send=self.send_to_worker, last_words=self._last_words)
        self.slots = self.life.slots
        self.name = paths.name
        self.pid = os.getpid()
        self.uid = os.getuid()
        self.pending: list[PendingStop] = []
        self.started = clock()
        self.endpoint = config.control or paths.control_endpoint
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sigr = -1
        self._sigw = -1
        self.on_ready: Callable[[Supervisor], None] | None = None
        self.on_progress: Callable[[Supervisor], None] | None = None  # until ready (--detach)
        self._ready_fired = False
        self.notifier = Notifier()
        self._next_watchdog = clock()
        self.gate = Gate(self.uid, clock)
        self.watch: PidWatch | None = None
        self.yields = Yields(self.life, self._register_fd, self._unregister_fd)
        self.command: Command | None = None  # `-- CMD`
        self.command_wait = True  # start it once every GPU holds (False: --no-wait)
        self.stop_signal: int | None = None
        self.expires_at: float | None = None  # --max-hold
        if config.max_hold_s is not None:
            self.expires_at = self.started + config.max_hold_s

    @property
    def shutting_down(self) -> bool:
        return self.life.shutting_down

    def start_slot(self, slot: Slot, fresh: bool = False) -> None:
        self.life.start_slot(slot, fresh)

    # ---- sockets and signals ----------------------------------------------------------------

    def bind(self) -> None:
        """Create the sockets. The caller holds the instance lock already."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._ctx = ctx
        self.zap = ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind(zap.ZAP_ENDPOINT)
        self.workers = ctx.socket(zmq.ROUTER)
        self.control = ctx.socket(zmq.ROUTER)
        for sock in (self.workers, self.control):
            sock.linger = 0
            sock.setsockopt(zmq.MAXMSGSIZE, _HARD_MAX_MSG)
            sock.zap_domain = zap.DOMAIN
        self.workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.endpoint.startswith("tcp://"):
            self.gate.serve_curve(self.control)
        old = os.umask(0o177)  # socket files are created 0600
        try:
            self.workers.bind(self.paths.workers_endpoint)
            self.control.bind(self.endpoint)
        finally:
            os.umask(old)
        # `tcp://HOST:*`: report the port the kernel chose (status, pid file, --detach line).
        self.endpoint = self.control.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        self.poller_quiet = zmq.Poller()  # the same without the workers socket
        for sock in (self.zap, self.workers, self.control):
            self.poller.register(sock, zmq.POLLIN)
            if sock is not self.workers:
                self.poller_quiet.register(sock, zmq.POLLIN)

    def install_signals(self) -> None:
        self._sigr, self._sigw = os.pipe()
        for fd in (self._sigr, self._sigw):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self._sigw, warn_on_full_buffer=False)
        for sig in _HANDLED_SIGNALS:
            signal.signal(sig, _noop_handler)
        self.poller.register(self._sigr, zmq.POLLIN)
        self.poller_quiet.register(self._sigr, zmq.POLLIN)

    def _register_fd(self, fd: int) -> None:
        self.poller.register(fd, zmq.POLLIN)
        self.poller_quiet.register(fd, zmq.POLLIN)

    def _unregister_fd(self, fd: int) -> None:
        self.poller.unregister(fd)
        self.poller_quiet.unregister(fd)

    def watch_pid(self, pid: int) -> None:
        """Release everything, exactly as on SIGTERM, once process `pid` ends (--exit-with)."""
        self.watch = PidWatch(pid)
        how = "pidfd" if self.watch.fd is not None else "polled"
        log.info("exits with pid %d (%s)", pid, how, extra=fields("exit-with", watched_pid=pid,
                                                                   how=how))
        if self.watch.fd is not None:
            self.poller.register(self.watch.fd, zmq.POLLIN)
            self.poller_quiet.register(self.watch.fd, zmq.POLLIN)

    def run(self) -> int:
        """Start every worker and serve until released. Returns the process exit code."""
        try:
            for slot in self.slots.values():
                self.start_slot(slot, fresh=True)
            if self.command is not None and not self.command_wait:
                self._start_command()
            code = self._loop()
            cmd = self.command
            if cmd is None:
                return code
            if cmd.code is not None:
                return cmd.code
            return 128 + self.stop_signal if self.stop_signal is not None else code
        finally:
            self._cleanup()

    def _loop(self) -> int:
        life = self.life
        due = self.clock()
        batch_until = 0.0
        awake = due  # when the previous poll returned
        while True:
            now = self.clock()
            # Heartbeats are gathered in batches: after a wake-up for worker messages alone the
            # workers socket rests for _HB_BATCH_S (control, signals and deadlines still wake us).
            resting = now < batch_until and not life.dirty
            wake = min(due, batch_until) if resting else due
            wait = max(0.0, min(_MAX_POLL_S, wake - now))
            poller = self.poller_quiet if resting else self.poller
            events = dict(poller.poll(int(math.ceil(wait * 1000))))
            awake, before = self.clock(), awake
            # Time beyond what the poll timeout allowed is time this process did not run.
            if awake - before - wait > _STALL_SLACK_S:
                life.discount(awake - before - wait)
            if events.keys() == {self.workers}:
                batch_until = self.clock() + _HB_BATCH_S
            if self._sigr in events:
                self._drain_signals()
            self._check_watch(events)
            self.yields.check(events, self.clock())
            self._check_command()
            if self.zap in events:
                self._drain(self.zap, self._on_zap)
            if self.workers in events:
                self._drain(self.workers, self._on_worker)
            life.reap()
            if self.control in events:
                self._drain(self.control, self._on_control)
                life.dirty = True
            now = self.clock()
            # A heartbeat only moves deadlines later: most wake-ups need no sweep over the slots.
            if not life.dirty and now < due:
                continue
            life.dirty = False
            now = self._read_heartbeats(now)
            life.tick(now)
            self._check_expiry(now)
            self._watchdog()
            code = self._finish_if_done()
            if code is not None:
                return code
            due = self._next_deadline(self.clock())

    def _read_heartbeats(self, now: float) -> float:
        """No hang verdict on unread heartbeats: drain, and when a verdict is due give what the
        ZeroMQ I/O thread still holds a short, bounded chance to arrive. Returns the time."""
        self._drain(self.workers, self._on_worker)
        if self.life.hang_due(now) and self.workers.poll(int(_LAST_CHANCE_S * 1000)):
            self._drain(self.workers, self._on_worker)
            now = self.clock()
        return now

    def _watchdog(self) -> None:
        if self.notifier.watchdog_s is None:
            return
        now = self.clock()
        if now >= self._next_watchdog:
            self.notifier.send("WATCHDOG=1")
            self._next_watchdog = now + self.notifier.watchdog_s

    def _cleanup(self) -> None:
        """Whatever happened, leave no worker behind and no socket open."""
        for slot in self.slots.values():
            if slot.proc is not None and slot.proc.poll() is None:
                procs.kill_group(slot.proc.pid)
        if self.watch is not None:
            self.watch.close()
        self.yields.close()
        if self._sigw >= 0:
            # The release is over: a late SIGTERM (an epilog after `keepgpu-ctl stop`) must not
            # turn the exit code into -15. Python's finalization restores SIG_DFL for handlers it
            # installed, but leaves ignored signals alone.
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            signal.set_wakeup_fd(-1)
            for fd in (self._sigr, self._sigw):
                os.close(fd)
            self._sigw = self._sigr = -1
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    # ---- events ----------------------------------------------------------------------------

    def _drain(self, sock: zmq.Socket[bytes], handle: Callable[[list[bytes]], None]) -> None:
        # Bounded, so that other sockets and deadlines get their turn. (Asking ZMQ_EVENTS per
        # message costs more than the one zmq.Again that ends a drain.)
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)

    def _last_words(self, slot: Slot) -> None:
        # A worker sends `error` and exits (exit 1 or 78): the exit can be seen before the
        # message is read.
        # Wait a little (bounded) for it, so that status shows the worker's own words.
        deadline = self.clock() + _LAST_WORDS_S
        seen = slot.errors_seen
        while True:
            self._drain(self.workers, self._on_worker)
            left = deadline - self.clock()
            if slot.errors_seen != seen or left <= 0 or not self.workers.poll(int(left * 1000) + 1):
                return

    def _drain_signals(self) -> None:
        try:
            data = os.read(self._sigr, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGCHLD:
                self.life.reap_needed = True
            elif signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                name = signal.Signals(signum).name
                if self.command is not None and self.command.running:
                    # CMD decides: the GPUs are released once it has ended.
                    self.command.forward(signum)
                    continue
                self.stop_signal = self.stop_signal or signum
                if self.shutting_down:
                    log.warning("received %s again: SIGKILL without waiting for the join", name,
                                extra=fields("signal", signal=name, again=True))
                    self.life.hurry()
                else:
                    log.info("received %s: releasing every GPU", name,
                             extra=fields("signal", signal=name, again=False))
                self.request_stop(list(self.slots.values()), full=True, envelope=None, req_id=None)

    def _check_watch(self, events: dict[Any, int]) -> None:
        watch = self.watch
        if watch is None or not watch.ended(events, self.clock()):
            return
        if watch.fd is not None:
            self.poller.unregister(watch.fd)
            self.poller_quiet.unregister(watch.fd)
        watch.close()
        self.watch = None
        log.info("watched pid %d ended: releasing every GPU", watch.pid,
                 extra=fields("watched-ended", watched_pid=watch.pid))
        self.request_stop(list(self.slots.values()), full=True, envelope=None, req_id=None)

    def _start_command(self) -> None:
        assert self.command is not None
        self.command.start()
        if self.command.code is not None:  # could not be run: release at once
            self.request_stop(list(self.slots.values()), full=True, envelope=None, req_id=None)

    def _check_command(self) -> None:
        if self.command is not None and self.command.poll() and not self.shutting_down:
            self.request_stop(list(self.slots.values()), full=True, envelope=None, req_id=None)

    def _check_expiry(self, now: float) -> None:
        if self.expires_at is None or now < self.expires_at or self.shutting_down:
            return
        log.info("--max-hold reached: releasing every GPU")
        self.request_stop(list(self.slots.values()), full=True, envelope=None, req_id=None)

    def set_max_hold(self, seconds: float | None) -> dict[str, Any]:
        """`set {max_hold}`: release everything `seconds` from now (None: no limit)."""
        now = self.clock()
        self.expires_at = None if seconds is None else now + seconds
        self.life.dirty = True
        log.info("max hold set: %s", "none" if seconds is None else f"{seconds:g}s from now")
        return {"hold_left_s": self._hold_left(now)}

    def _hold_left(self, now: float) -> float | None:
        return None if self.expires_at is None else round(max(0.0, self.expires_at - now), 3)

    def yield_to(self, slots: list[Slot], pid: int, envelope: list[bytes], req_id: Any) -> None:
        """`yield`: stop the slots' workers while `pid` lives; reply once they have exited."""
        now = self.clock()
        self.life.dirty = True
        self.yields.add(slots, pid, now)
        self.pending.append(PendingStop(envelope, req_id, [s.gpu for s in slots], now, pid))

    def _on_zap(self, frames: list[bytes]) -> None:
        self.zap.send_multipart(self.gate.answer(frames))

    def _on_worker(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        ident = wire.parse_identity(frames[0])
        slot = self.slots.get(ident[0]) if ident else None
        if ident is None or slot is None or ident[1] != slot.incarnation:
            log.debug("ignored a message from stale or unknown worker %r", frames[0])
            return
        msg = wire.decode(frames[1], wire.WORKER_TYPES)
        if msg is None:
            log.warning("gpu=%d: malformed worker message ignored", slot.gpu,
                        extra=fields("bad-worker-message", gpu=slot.gpu))
            return
        self.life.on_message(slot, msg)

    def _on_control(self, frames: list[bytes]) -> None:
        if len(frames) < 2 or len(frames) > 4:
            return  # not a REQ/DEALER envelope we can answer
        envelope, payload = frames[:-1], frames[-1]
        req_id = None
        try:
            req = parse_request(payload)
            req_id = req.id
            result = COMMANDS[req.cmd](self, req, envelope)
        except ProtocolError as exc:
            rid = getattr(exc, "request_id", req_id)
            self._reply(envelope, error_reply(rid, exc.code, exc.message))
            return
        except Exception as exc:  # noqa: BLE001 - client input must never kill the supervisor
            log.exception("control command failed", extra=fields("command-failed"))
            self._reply(envelope, error_reply(req_id, "internal", f"{type(exc).__name__}: {exc}"))
            return
        if result is not None:
            self._reply(envelope, ok_reply(req_id, result))

    def _reply(self, envelope: list[bytes], payload: bytes) -> None:
        try:
            self.control.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("control reply dropped: %s", exc)

    def send_to_worker(self, slot: Slot, kind: str, **fields: Any) -> bool:
        try:
            self.workers.send_multipart(
                [wire.identity(slot.gpu, slot.incarnation), wire.encode(kind, **fields)],
                zmq.NOBLOCK,
            )
            return True
        except zmq.ZMQError:
            return False  # not connected yet (starting) or already gone

    def request_stop(
        self, slots: list[Slot], full: bool, envelope: list[bytes] | None, req_id: Any
    ) -> None:
        now = self.clock()
        self.life.dirty = True
        if full and not self.life.shutting_down:
            self.life.shutting_down = True
            self.notifier.send("STOPPING=1")
        for slot in slots:
            self.life.begin_stop(slot, "stopped", now)
        if envelope is not None:
            self.pending.append(PendingStop(envelope, req_id, [s.gpu for s in slots], now))

    def _next_deadline(self, now: float) -> float:
        best = min(now + _MAX_POLL_S, self.life.next_deadline(now))
        if self.notifier.watchdog_s is not None:
            best = min(best, self._next_watchdog)
        if self.watch is not None:
            best = min(best, self.watch.next_check)
        if self.expires_at is not None and not self.shutting_down:
            best = min(best, self.expires_at)
        return min(best, self.yields.next_check)

    def _maybe_ready(self) -> None:
        """Once every GPU holds or has failed: --detach's parent is told, and systemd."""
        if self._ready_fired:
            return
        if self.on_progress is not None:
            self.on_progress(self)
        if all(s.state in (*LIVE_STATES, *DONE_STATES, "yielded") for s in self.slots.values()):
            self._ready_fired = True
            holding = sum(s.state in LIVE_STATES for s in self.slots.values())
            self.notifier.send(f"READY=1\nSTATUS={holding}/{len(self.slots)} GPUs holding")
            if self.on_ready is not None:
                self.on_ready(self)
            cmd = self.command
            if cmd is not None and not cmd.started and not self.shutting_down and holding:
                self._start_command()

    # ---- completion ------------------------------------------------------------------------

    def _finish_if_done(self) -> int | None:
        now = self.clock()
        self._maybe_ready()
        still: list[PendingStop] = []
        for pend in self.pending:
            slots = [self.slots[g] for g in pend.gpus]
            if any(s.state == "stopping" for s in slots):
                still.append(pend)
                continue
            self._reply(pend.envelope, ok_reply(pend.req_id, self._stop_result(slots, pend)))
        self.pending = still
        states = [s.state for s in self.slots.values()]
        if self.command is not None and self.command.running:
            return None  # GPUs released or fatal: the exit code is CMD's, once it ends
        if self.shutting_down and all(s in DONE_STATES for s in states) and not self.pending:
            outcomes = [s.stop.outcome if s.stop else "released" for s in self.slots.values()]
            clean = all(o == "released" for o in outcomes)
            took = now - min((s.stop.started for s in self.slots.values() if s.stop), default=now)
            log.info("released every GPU in %.2fs", took,
                     extra=fields("released", seconds=round(took, 3), clean=clean))
            return 0 if clean else 1
        if states and all(s == "fatal" for s in states) and not self.pending:
            # Each GPU's failure was logged once when it happened (its state line).
            log.error("every GPU is fatal; exiting", extra=fields("all-fatal"))
            return 4
        return None

    def _stop_result(self, slots: list[Slot], pend: PendingStop) -> dict[str, Any]:
        gpus = []
        for s in slots:
            op = s.stop
            seconds = (op.finished or pend.started) - max(op.started, pend.started) if op else 0.0
            gpus.append({
                "gpu": s.gpu,
                "outcome": op.outcome if op and op.outcome else "released",
                "seconds": round(max(0.0, seconds), 3),
                "pid": s.unkillable_pid,
                "error": s.error if s.state == "unkillable" else None,
            })
        if pend.yield_pid is not None:
            return {"gpus": gpus, "pid": pend.yield_pid, "exiting": self.shutting_down}
        return {"gpus": gpus, "exiting": self.shutting_down}

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "name": self.name,
            "version": __version__,
            "state": "stopping" if self.shutting_down else "running",
            "uptime_s": round(now - self.started, 3),
            "endpoint": self.endpoint,
            "config": self.config.public(),
            "hold_left_s": self._hold_left(now),
            "command_pid": self.command.pid if self.command else None,
        }


def _noop_handler(signum: int, frame: object) -> None:
    """The C-level handler writes `signum` to the wakeup fd; the loop does the work."""
