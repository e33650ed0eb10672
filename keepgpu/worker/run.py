"""The worker process: connect, open the engine, hold, keep the device busy, heartbeat, release.

Heartbeats are sent by the keep loop itself (a stuck device call stops them, which is how the
supervisor sees a hang). Exit codes: 0 released on request, 1 engine failure, 78 bad config.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import time
from collections.abc import Collection
from typing import Any

import zmq

from keepgpu.logfmt import FORMATS, WORKER_FORMAT_ENV, WORKER_LEVEL_ENV, fields, formatter
from keepgpu.logsink import NonBlockingHandler
from keepgpu.protocol import wire
from keepgpu.protocol.units import UnitError, VramRequest, format_bytes, parse_vram
from keepgpu.telemetry.base import GpuSample
from keepgpu.worker.engines.base import (
    CHUNK_BYTES,
    MAX_PULSE_S,
    ConfigurationError,
    DeviceIdentity,
    Engine,
    EngineError,
)
from keepgpu.worker.governor import Decision, Governor
from keepgpu.worker.policy import BUSY_CLEAR_S, THERMAL_HYSTERESIS_C
from keepgpu.worker.settings import Settings

log = logging.getLogger("keepgpu.worker")

CONTROL_INTERVAL_S = 0.5
FINAL_LINGER_MS = 500
MAX_WAIT_S = 0.05  # stop and pause take effect within this
PSTATE_PERIOD_S = 0.05  # ≤ 100 ms between pstate kernels keeps the clocks up
PSTATE_PULSE_S = 0.0002
GROW_STEP_BYTES = 4 * CHUNK_BYTES  # per loop iteration: 1 GiB at most between two polls
GROW_RETRY_S = 5.0  # after an out-of-memory stop, try growing again this much later


def pulse_schedule(mode: str, duty: float) -> tuple[float, float] | None:
    """(pulse seconds, period seconds) for a mode at a duty fraction; None = no pulses.

    Duty 0 (paused, busy, too hot, a quiet probe) means no pulses in every mode; any other
    duty in `pstate` mode is its fixed schedule.
    """
    if duty <= 0:
        return None
    if mode == "pstate":
        return PSTATE_PULSE_S, PSTATE_PERIOD_S
    on = MAX_PULSE_S if duty >= 0.5 else MAX_PULSE_S / 2
    return on, on / min(1.0, duty)


def make_engine(settings: Settings, incarnation: int) -> Engine:
    if settings.engine == "fake":
        from keepgpu.worker import faults
        from keepgpu.worker.engines.fake import FakeEngine

        found = faults.load(settings.device_entry, incarnation)
        scenario = os.environ.get("KEEPGPU_FAKE_TELEMETRY", "idle")
        return FakeEngine(settings.device_entry, found, scenario)
    from keepgpu.worker.engines.torch_engine import TorchEngine

    return TorchEngine(settings.engine, expected_uuid=settings.uuid, entry=settings.device_entry)


class KeepLoop:
    """The worker's single loop: pulses, control ticks, heartbeats and supervisor messages.

    Nothing in it blocks longer than MAX_WAIT_S (a pulse is queued, not waited for; growth of
    the hold goes GROW_STEP_BYTES per iteration), so STOP and pause take effect within 50 ms.
    """

    def __init__(self, sock: zmq.Socket[bytes], engine: Engine, settings: Settings) -> None:
        self.sock = sock
        self.engine = engine
        self.settings = settings
        self.governor = Governor(settings, time.monotonic(), own_pids=(os.getpid(),))
        self.identity: DeviceIdentity | None = None
        self.stop_requested = False
        self.progress = 0
        self.sample: GpuSample | None = None
        self.decision = Decision("holding", None, 0.0)
        self.want_bytes = 0
        self._grow_blocked_until = 0.0
        self._telemetry_failed = False

    def send(self, kind: str, **fields: Any) -> None:
        try:
            self.sock.send(wire.encode(kind, **fields), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("dropped %s: %s", kind, exc)

    def target_bytes(self, vram: VramRequest | None = None) -> int:
        """Bytes --vram asks for on this device (raises ConfigurationError above its total)."""
        total = self.identity.mem_total_bytes if self.identity else None
        want = (vram or self.settings.vram).resolve(total)
        if total is not None and want > total:
            raise ConfigurationError(f"--vram {want} bytes exceeds the device's {total} bytes")
        return want

    def start(self) -> None:
        self.identity = self.engine.open()
        self.want_bytes = self.target_bytes()
        self.engine.resize(self.want_bytes)
        mark = getattr(self.engine, "mark_ready", None)
        if mark is not None:
            mark()
        self.send(
            "ready",
            pid=os.getpid(),
            uuid=self.identity.uuid,
            name=self.identity.name,
            held_bytes=self.engine.held_bytes,
            mem_total_bytes=self.identity.mem_total_bytes,
        )
        log.info("holding %s on %s (%s), mode %s, target %g%%",
                 format_bytes(self.engine.held_bytes), self.identity.uuid, self.identity.name,
                 self.settings.mode, self.settings.target_util,
                 extra=fields("ready", held_bytes=self.engine.held_bytes,
                              uuid=self.identity.uuid, name=self.identity.name,
                              mem_total_bytes=self.identity.mem_total_bytes,
                              mode=self.settings.mode, target_util_pct=self.settings.target_util))

    def run(self) -> None:
        now = time.monotonic()
        next_pulse = next_hb = next_ctrl = now
        while not self.stop_requested:
            self.progress += 1
            tick = getattr(self.engine, "tick", None)
            if tick is not None:
                tick()
            now = time.monotonic()
            if now >= next_ctrl:
                self._control(now)
                next_ctrl = now + CONTROL_INTERVAL_S
            self._step_hold(now)
            if now >= next_hb:
                self._heartbeat()
                next_hb = now + self.settings.heartbeat_s
            plan = pulse_schedule(self.settings.mode, self.decision.duty)
            if plan is not None and now >= next_pulse:
                if not self.engine.busy():
                    self.engine.pulse(self.settings.mode, plan[0])
                next_pulse = now + plan[1]
            wake = min(next_hb, next_ctrl, next_pulse if plan else next_hb)
            if self.engine.held_bytes < self.want_bytes and now >= self._grow_blocked_until:
                wake = now  # keep growing the hold step by step
            wait = min(MAX_WAIT_S, max(0.0, wake - time.monotonic()))
            if self.sock.poll(int(wait * 1000)):
                self._drain()

    def _read(self) -> GpuSample | None:
        try:
            sample = self.engine.telemetry().sample([os.getpid()])
        except Exception as exc:  # noqa: BLE001 - a telemetry bug must not stop the keeper
            if not self._telemetry_failed:
                log.exception("telemetry failed (going on without it): %s", exc,
                              extra=fields("telemetry-failed", error=str(exc)))
            self._telemetry_failed = True
            return None
        if self._telemetry_failed:
            log.info("telemetry is back", extra=fields("telemetry-back"))
        self._telemetry_failed = False
        return sample

    def _control(self, now: float) -> None:
        """Read the device, decide, and set the hold target (raises DeviceLost)."""
        self.sample = self._read()
        observe = getattr(self.engine, "observe", None)
        if observe is not None:
            observe(self.sample)
        for note in getattr(self.engine, "take_notices", list)():
            self.send("error", message=note)
        decision = self.governor.decide(self.sample, now, self.engine.held_bytes,
                                        self.target_bytes(), self.engine.own_duty())
        if (decision.state, decision.reason) != (self.decision.state, self.decision.reason):
            text, extra = describe_change(decision, self.sample, self.engine.held_bytes,
                                          self.settings)
            log.info("%s", text, extra=extra)
        self.decision = decision
        target = self.target_bytes()
        self.want_bytes = target if decision.hold_bytes is None else min(target,
                                                                          decision.hold_bytes)
        if self.want_bytes < self.engine.held_bytes:
            before = self.engine.held_bytes
            self.engine.resize(self.want_bytes)
            log.info("hold shrunk from %s to %s (%s)", format_bytes(before),
                     format_bytes(self.engine.held_bytes), decision.reason or "--vram",
                     extra=fields("hold-shrunk", before_bytes=before,
                                  held_bytes=self.engine.held_bytes, reason=decision.reason))

    def _step_hold(self, now: float) -> None:
        """Grow towards want_bytes by at most GROW_STEP_BYTES (stays responsive); on out of
        memory wait GROW_RETRY_S before trying again."""
        held = self.engine.held_bytes
        if held >= self.want_bytes or now < self._grow_blocked_until:
            return
        step = min(self.want_bytes, held + GROW_STEP_BYTES)
        if self.engine.resize(step) < step:
            self._grow_blocked_until = now + GROW_RETRY_S
        elif self.engine.held_bytes >= self.want_bytes:
            log.debug("hold grown to %s", format_bytes(self.engine.held_bytes),
                      extra=fields("hold-grown", held_bytes=self.engine.held_bytes))

    def heartbeat_fields(self) -> dict[str, Any]:
        """The telemetry part of a heartbeat: the protocol's fields (None = unknown) and ours."""
        fields = (self.sample or GpuSample()).status_fields()
        fields["duty_pct"] = round(self.engine.own_duty() * 100.0, 2)
        fields["duty_target_pct"] = round(self.decision.duty * 100.0, 2)
        others = self.decision.others_util_pct
        fields["others_util_pct"] = None if others is None else round(others, 2)
        fields["probing"] = self.decision.probing
        fields["target_reachable"] = self.decision.target_reachable
        fields["telemetry_error"] = self.sample.error if self.sample else "no telemetry"
        fields["policy"] = self.policy_fields(time.monotonic())
        fields["other_processes"] = other_processes(self.sample, self.governor.own_pids)
        return fields

    def policy_fields(self, now: float) -> dict[str, Any]:
        """What the keep loop judges by right now, so that `keepgpu-ctl explain` can say what
        would change the state (protocol: `policy` in a status GPU entry)."""
        s, busy = self.settings, self.governor.busy
        try:
            target: int | None = self.target_bytes()
        except ConfigurationError:
            target = None
        return {
            "mode": s.mode,
            "target_util": s.target_util,
            "busy_threshold": s.busy_threshold,
            "max_temp": s.max_temp,
            "on_pressure": s.on_pressure,
            "hold_target_bytes": target,
            "hold_want_bytes": self.want_bytes,
            "busy_clear_s": BUSY_CLEAR_S,
            "calm_for_s": None if busy.calm_since is None else round(now - busy.calm_since, 2),
            "thermal_resume_c": s.max_temp - THERMAL_HYSTERESIS_C,
        }

    def _heartbeat(self) -> None:
        self.send(
            "hb",
            progress=self.progress,
            state=self.decision.state,
            reason=self.decision.reason,
            held_bytes=self.engine.held_bytes,
            telemetry=self.heartbeat_fields(),
        )

    def _drain(self) -> None:
        for _ in range(100):
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = wire.decode(frame, wire.SUPERVISOR_TYPES)
            if msg is not None:
                self._handle(msg)

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        now = time.monotonic()
        if kind == "stop":
            if self.engine.ignores_stop:
                log.warning("ignoring STOP (test fault)", extra=fields("stop-ignored"))
            else:
                self.stop_requested = True
                return
        elif kind == "pause":
            seconds = msg.get("seconds")
            self.governor.pause(float(seconds) if seconds is not None else None, now)
            self._control(now)
        elif kind == "resume":
            self.governor.resume()
            self._control(now)
        elif kind == "set":
            self._apply_set({k: v for k, v in msg.items() if k != "t"}, now)
        self._heartbeat()

    def _apply_set(self, changes: dict[str, Any], now: float) -> None:
        """`keepgpu-ctl set`: every field takes effect at once (vram, mode, target_util,
        busy_threshold, max_temp, on_pressure); a bad value changes nothing."""
        try:
            if "vram" in changes:
                self.target_bytes(parse_vram(changes["vram"]))  # fits this device?
            changed = self.settings.apply(changes)
        except (ConfigurationError, UnitError, ValueError, TypeError) as exc:
            # Logged here, once: the supervisor only records the error message.
            log.error("set refused: %s", exc, extra=fields("set-refused", error=str(exc)))
            self.send("error", message=f"set refused: {exc}", refused="set")
            return
        values = {key: _plain(getattr(self.settings, key)) for key in changed}
        log.info("settings changed: %s", ", ".join(f"{k}={v}" for k, v in values.items())
                 or "none", extra=fields("settings-changed", changed=values))
        self._control(now)

    def release(self) -> None:
        """Free the hold and say so (the supervisor then sees a clean exit)."""
        held = self.engine.held_bytes
        self.engine.release()
        log.info("released %s", format_bytes(held), extra=fields("released", released_bytes=held))
        self.send("stopped", held_bytes=0)


#: Other processes named in a heartbeat (the busiest first): enough to say who is in the way.
OTHER_PROCESSES_MAX = 3


def other_processes(sample: GpuSample | None, own_pids: Collection[int]) -> list[dict[str, Any]]:
    """The busiest processes on the device that are not the keeper (protocol:
    `other_processes`): pid, uid (null when unknown), util_pct (null when not per process),
    used_bytes."""
    procs = [p for p in (sample.processes if sample and sample.processes else ())
             if p.pid not in own_pids]
    procs.sort(key=lambda p: (p.util_pct or 0.0, p.used_bytes or 0), reverse=True)
    return [{"pid": p.pid, "uid": p.uid, "util_pct": p.util_pct, "used_bytes": p.used_bytes}
            for p in procs[:OTHER_PROCESSES_MAX]]


def describe_change(decision: Decision, sample: GpuSample | None, held: int,
                    settings: Settings) -> tuple[str, dict[str, Any]]:
    """The one log line for a state/reason change, with the readings that led to it: (text in
    human units, structured fields for `extra=`)."""

    def show(value: float | None, unit: str) -> str:
        return "-" if value is None else f"{value:.0f}{unit}"

    s = sample or GpuSample()
    line = (
        f"state={decision.state} reason={decision.reason or '-'}: "
        f"util {show(s.util_pct, '%')} (own {show(s.own_util_pct, '%')}, "
        f"others {show(decision.others_util_pct, '%')}, busy above "
        f"{settings.busy_threshold:g}%), {show(s.temp_c, ' °C')} (pause above "
        f"{settings.max_temp:g} °C), {show(s.power_w, ' W')}, {s.pstate or 'pstate -'}, "
        f"memory {format_bytes(s.mem_used_bytes)} used of {format_bytes(s.mem_total_bytes)}, "
        f"holding {format_bytes(held)}, duty {decision.duty * 100:.0f}%"
    )
    extra = fields(
        "state", state=decision.state, reason=decision.reason, util_pct=s.util_pct,
        own_util_pct=s.own_util_pct, others_util_pct=decision.others_util_pct,
        busy_threshold_pct=settings.busy_threshold, temp_c=s.temp_c,
        max_temp_c=settings.max_temp, power_w=s.power_w, pstate=s.pstate,
        mem_used_bytes=s.mem_used_bytes, mem_total_bytes=s.mem_total_bytes, held_bytes=held,
        duty_pct=round(decision.duty * 100, 2), telemetry_error=s.error,
    )
    return line + (f", telemetry error: {s.error}" if s.error else ""), extra


def _plain(value: Any) -> Any:
    """A settings value as json can carry it (a VramRequest becomes its text)."""
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m keepgpu.worker")
    p.add_argument("--gpu", type=int, required=True)
    p.add_argument("--incarnation", type=int, required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--supervisor-pid", type=int, required=True)
    p.add_argument("--settings", required=True)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    # fd 2 is the supervisor's stderr, possibly a pipe nobody reads: never block on it.
    handler = NonBlockingHandler(2)
    # The supervisor's --log-format (every line of its stderr has one format).
    fmt = os.environ.get(WORKER_FORMAT_ENV, "text")
    handler.setFormatter(formatter(
        fmt if fmt in FORMATS else "text",
        f"keepgpu-worker[gpu={args.gpu} pid=%(process)d inc={args.incarnation}]",
        {"gpu": args.gpu, "incarnation": args.incarnation}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get(WORKER_LEVEL_ENV, "INFO").upper())
    logging.captureWarnings(True)  # through the handler: raw text would break a json log
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = wire.identity(args.gpu, args.incarnation)
    sock.connect(args.endpoint)
    loop: KeepLoop | None = None

    def on_term(signum: int, frame: object) -> None:
        if loop is None:
            raise SystemExit(0)  # nothing held yet: just go
        if not loop.engine.ignores_stop:
            loop.stop_requested = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        settings = Settings.from_wire(json.loads(args.settings))
        loop = KeepLoop(sock, make_engine(settings, args.incarnation), settings)
        loop.start()
        loop.run()
        loop.release()
        return 0
    except (ConfigurationError, ValueError) as exc:  # UnitError is a ValueError
        # Logged here, once (the supervisor records the message without repeating it).
        log.error("%s", exc, extra=fields("config-error", error=str(exc), exit_code=78))
        if loop is not None:
            loop.send("error", message=str(exc))
        else:
            sock.send(wire.encode("error", message=str(exc)), zmq.NOBLOCK)
        return 78
    except EngineError as exc:
        log.error("%s: exiting for the supervisor to restart", exc,
                  extra=fields("engine-error", error=str(exc), exit_code=1))
        sock.send(wire.encode("error", message=str(exc)), zmq.NOBLOCK)
        return 1
    except Exception as exc:  # an unforeseen device error: still last words, no silent exit
        log.exception("worker failed: %s", exc,
                      extra=fields("worker-failed", error=str(exc), exit_code=1))
        sock.send(wire.encode("error", message=f"worker failed: {exc}"), zmq.NOBLOCK)
        return 1
    finally:
        # Bounded linger: the last words (`error`, `stopped`) must leave before we exit, but a
        # dead supervisor must not keep us here.
        sock.close(linger=FINAL_LINGER_MS)
        ctx.term()
