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
import sys
import time
from typing import Any

import zmq

from keepgpu.protocol import wire
from keepgpu.protocol.units import UnitError
from keepgpu.telemetry.base import GpuSample
from keepgpu.worker.engines.base import (
    MAX_PULSE_S,
    ConfigurationError,
    DeviceIdentity,
    Engine,
    EngineError,
)
from keepgpu.worker.governor import Decision, Governor
from keepgpu.worker.settings import Settings

log = logging.getLogger("keepgpu.worker")

CONTROL_INTERVAL_S = 0.5
MAX_WAIT_S = 0.05  # stop and pause take effect within this
PSTATE_PERIOD_S = 0.05
PSTATE_PULSE_S = 0.0002


def pulse_schedule(mode: str, duty: float) -> tuple[float, float] | None:
    """(pulse seconds, period seconds) for a mode at a duty fraction; None = no pulses."""
    if mode == "pstate":
        return PSTATE_PULSE_S, PSTATE_PERIOD_S
    if duty <= 0:
        return None
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

    return TorchEngine(settings.engine)


class KeepLoop:
    def __init__(self, sock: zmq.Socket[bytes], engine: Engine, settings: Settings) -> None:
        self.sock = sock
        self.engine = engine
        self.settings = settings
        self.governor = Governor(settings, time.monotonic())
        self.identity: DeviceIdentity | None = None
        self.stop_requested = False
        self.progress = 0
        self.sample: GpuSample | None = None
        self.decision = Decision("holding", None, 0.0)

    def send(self, kind: str, **fields: Any) -> None:
        try:
            self.sock.send(wire.encode(kind, **fields), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("dropped %s: %s", kind, exc)

    def target_bytes(self) -> int:
        total = self.identity.mem_total_bytes if self.identity else None
        want = self.settings.vram.resolve(total)
        if total is not None and want > total:
            raise ConfigurationError(f"--vram {want} bytes exceeds the device's {total} bytes")
        return want

    def start(self) -> None:
        self.identity = self.engine.open()
        self.engine.resize(self.target_bytes())
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
        log.info("holding %d bytes on %s (%s)", self.engine.held_bytes, self.identity.uuid,
                 self.identity.name)

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
            if now >= next_hb:
                self._heartbeat()
                next_hb = now + self.settings.heartbeat_s
            plan = pulse_schedule(self.settings.mode, self.decision.duty)
            if self.decision.state == "backoff":
                plan = None
            if plan is not None and now >= next_pulse:
                if not self.engine.busy():
                    self.engine.pulse(self.settings.mode, plan[0])
                next_pulse = now + plan[1]
            wake = min(next_hb, next_ctrl, next_pulse if plan else next_hb)
            wait = min(MAX_WAIT_S, max(0.0, wake - time.monotonic()))
            if self.sock.poll(int(wait * 1000)):
                self._drain()

    def _control(self, now: float) -> None:
        self.sample = self.engine.telemetry().sample([os.getpid()])
        decision = self.governor.decide(self.sample, now)
        if (decision.state, decision.reason) != (self.decision.state, self.decision.reason):
            log.info("state=%s reason=%s", decision.state, decision.reason or "-")
        self.decision = decision
        want = decision.hold_bytes if decision.hold_bytes is not None else self.target_bytes()
        if want != self.engine.held_bytes:
            self.engine.resize(want)

    def _heartbeat(self) -> None:
        fields = self.sample.status_fields() if self.sample else {}
        fields["duty_pct"] = round(self.engine.own_duty() * 100.0, 2)
        self.send(
            "hb",
            progress=self.progress,
            state=self.decision.state,
            reason=self.decision.reason,
            held_bytes=self.engine.held_bytes,
            telemetry=fields,
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
                log.warning("ignoring STOP (test fault)")
            else:
                self.stop_requested = True
        elif kind == "pause":
            seconds = msg.get("seconds")
            self.governor.pause(float(seconds) if seconds is not None else None, now)
            self._control(now)
        elif kind == "resume":
            self.governor.resume()
            self._control(now)
        elif kind == "set":
            changes = {k: v for k, v in msg.items() if k != "t"}
            try:
                changed = self.settings.apply(changes)
            except (UnitError, ValueError) as exc:
                log.error("set refused: %s", exc)
                return
            log.info("settings changed: %s", ", ".join(changed))
            self._control(now)
        self._heartbeat()

    def release(self) -> None:
        self.engine.release()
        self.send("stopped", held_bytes=0)


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
    logging.basicConfig(
        level=os.environ.get("KEEPGPU_WORKER_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s keepgpu-worker[gpu={args.gpu} pid=%(process)d] %(levelname)s "
        "%(message)s",
        stream=sys.stderr,
    )
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    settings = Settings.from_wire(json.loads(args.settings))
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
        loop = KeepLoop(sock, make_engine(settings, args.incarnation), settings)
        loop.start()
        loop.run()
        loop.release()
        return 0
    except (ConfigurationError, UnitError) as exc:
        log.error("%s", exc)
        if loop is not None:
            loop.send("error", message=str(exc))
        else:
            sock.send(wire.encode("error", message=str(exc)), zmq.NOBLOCK)
        return 78
    except EngineError as exc:
        log.error("%s", exc)
        sock.send(wire.encode("error", message=str(exc)), zmq.NOBLOCK)
        return 1
    finally:
        sock.close(linger=0)
        ctx.term()
