"""A hypothesis state machine over SlotLifecycle with an injected clock and fake processes:
whatever workers do (crash, hang, ignore SIGTERM or even SIGKILL) and whatever the operator and
the host do (stop, start, stall the supervisor), the design's invariants hold."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from keepgpu.protocol.runtime import Paths
from keepgpu.supervisor import procs
from keepgpu.supervisor.config import SupervisorConfig
from keepgpu.supervisor.devices import Device
from keepgpu.supervisor.lifecycle import SWEEP_S, SlotLifecycle
from keepgpu.supervisor.slot import LIVE_STATES, Slot

STATES = {"starting", "holding", "backoff", "stopping", "stopped", "restarting", "fatal",
          "unkillable"}
GPUS = (0, 1)
CONFIG = SupervisorConfig(hang_timeout_s=2.0, start_timeout_s=3.0, join_timeout_s=1.0,
                          kill_timeout_s=1.0, max_restarts=3, restart_window_s=20.0,
                          restart_delay_s=0.5, restart_delay_max_s=4.0, healthy_reset_s=10.0)


class FakeProc:
    """A worker process as the lifecycle sees it: poll() and a pid, with a behaviour."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.hung = False  # no heartbeats, STOP and SIGTERM go unanswered
        self.ignores_term = False
        self.unkillable = False

    def poll(self) -> int | None:
        return self.returncode

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code


class LifecycleModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 100.0
        self.procs: dict[int, FakeProc] = {}
        self.patch = pytest.MonkeyPatch()
        self.patch.setattr(procs, "spawn_worker", self._spawn)
        self.patch.setattr(procs, "signal_pid", self._signal)
        self.patch.setattr(procs, "kill_group", self._kill)
        self.patch.setattr(procs, "proc_state", lambda pid: "D")
        devices = [Device(g, str(g), None) for g in GPUS]
        self.life = SlotLifecycle(CONFIG, devices, "cpu", Paths(Path("/nonexistent"), "m"),
                                  lambda: self.now, None, send=self._send)
        self.stop_began: dict[int, tuple[float, float]] = {}  # gpu -> (time, stalled_s then)
        self.restart_times: dict[int, list[float]] = {g: [] for g in GPUS}
        self.hb = 0
        for slot in self.life.slots.values():
            self.life.start_slot(slot, fresh=True)
        self._loop_step()

    def teardown(self) -> None:
        self.patch.undo()

    # ---- fakes at the process boundary -------------------------------------------------

    def _spawn(self, **kw: Any) -> FakeProc:
        proc = FakeProc(1000 + len(self.procs))
        self.procs[proc.pid] = proc
        return proc

    def _signal(self, pid: int, sig: int) -> bool:
        proc = self.procs[pid]
        if sig == signal.SIGTERM and not (proc.hung or proc.ignores_term):
            proc.exit(0)
        return proc.returncode is None

    def _kill(self, pid: int) -> None:
        proc = self.procs[pid]
        if not proc.unkillable:
            proc.exit(-signal.SIGKILL)

    def _send(self, slot: Slot, kind: str, **fields: Any) -> bool:
        proc = slot.proc
        if proc is None or proc.returncode is not None:
            return False
        if kind == "stop" and not (proc.hung or proc.ignores_term):
            proc.exit(0)
        return True

    # ---- the event loop, reduced to its clock ------------------------------------------

    def _loop_step(self) -> None:
        restarts = {g: s.restarts for g, s in self.life.slots.items()}
        self.life.reap_needed = True  # SIGCHLD
        self.life.reap()
        self.life.tick(self.now)
        for g, s in self.life.slots.items():
            if s.restarts > restarts[g]:
                self.restart_times[g].append(self.now)
            if s.state != "stopping":
                self.stop_began.pop(g, None)

    def _advance(self, dt: float) -> None:
        """Let time pass as the loop does: waking at every deadline on the way."""
        target = self.now + dt
        while self.now < target:
            self.now = min(target, max(self.now + 1e-6, self.life.next_deadline(self.now)))
            self._loop_step()

    def _slot(self, gpu: int) -> Slot:
        return self.life.slots[gpu]

    def _live_proc(self, gpu: int) -> FakeProc | None:
        proc = self._slot(gpu).proc
        return proc if isinstance(proc, FakeProc) and proc.returncode is None else None

    # ---- rules ---------------------------------------------------------------------------

    @rule(dt=st.floats(0.01, 3.0))
    def advance(self, dt: float) -> None:
        self._advance(dt)

    @rule(gpu=st.sampled_from(GPUS))
    def ready(self, gpu: int) -> None:
        proc = self._live_proc(gpu)
        if proc is not None and not proc.hung:
            self.life.on_message(self._slot(gpu), {"t": "ready", "mem_total_bytes": 2**30})
            self._loop_step()

    @rule(gpu=st.sampled_from(GPUS))
    def heartbeat(self, gpu: int) -> None:
        proc = self._live_proc(gpu)
        if proc is not None and not proc.hung:
            self.hb += 1
            self.life.on_message(self._slot(gpu), {"t": "hb", "progress": self.hb})

    @rule(gpu=st.sampled_from(GPUS), code=st.sampled_from([0, 1, 3, 78, -9]))
    def crash(self, gpu: int, code: int) -> None:
        proc = self._live_proc(gpu)
        if proc is not None:
            proc.exit(code)
            self._loop_step()

    @rule(gpu=st.sampled_from(GPUS))
    def hang(self, gpu: int) -> None:
        proc = self._live_proc(gpu)
        if proc is not None:
            proc.hung = True

    @rule(gpu=st.sampled_from(GPUS), unkillable=st.booleans())
    def stubborn(self, gpu: int, unkillable: bool) -> None:
        proc = self._live_proc(gpu)
        if proc is not None:
            proc.ignores_term = True
            proc.unkillable = unkillable

    @rule(gpu=st.sampled_from(GPUS))
    def stop(self, gpu: int) -> None:
        slot = self._slot(gpu)
        self.life.begin_stop(slot, "stopped", self.now)
        if slot.state == "stopping":
            self.stop_began.setdefault(gpu, (self.now, self.life.stalled_s))
        self._loop_step()

    @rule(gpu=st.sampled_from(GPUS))
    def start(self, gpu: int) -> None:
        slot = self._slot(gpu)
        if slot.state in ("stopped", "fatal", "restarting"):
            self.life.start_slot(slot, fresh=True)
            self.restart_times[gpu] = []
            self._loop_step()

    @rule(seconds=st.floats(0.6, 10.0))
    def stall(self, seconds: float) -> None:
        """The supervisor is SIGSTOPped: time passes with no tick, then it is told."""
        self.now += seconds
        self.life.discount(seconds)
        self._loop_step()

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def states_are_valid(self) -> None:
        for s in self.life.slots.values():
            assert s.state in STATES
            assert (s.proc is None) == (s.state in ("stopped", "restarting", "fatal")) or \
                s.state == "unkillable"

    @invariant()
    def next_deadline_is_finite_and_soon(self) -> None:
        due = self.life.next_deadline(self.now)
        assert math.isfinite(due) and due <= self.now + SWEEP_S + 1e-6

    @invariant()
    def nothing_is_overdue(self) -> None:
        for s in self.life.slots.values():
            if s.state in LIVE_STATES and s.last_hb is not None:
                assert self.now - s.last_hb < CONFIG.hang_timeout_s
            if s.state == "starting":
                assert self.now - s.spawned_at < CONFIG.start_timeout_s

    @invariant()
    def a_stop_finishes_within_join_plus_kill(self) -> None:
        bound = CONFIG.join_timeout_s + CONFIG.kill_timeout_s + 1e-6
        for g, (began, stalled) in self.stop_began.items():
            if self._slot(g).state == "stopping":
                assert self.now - began - (self.life.stalled_s - stalled) <= bound

    @invariant()
    def restart_intensity_is_bounded(self) -> None:
        for times in self.restart_times.values():
            for t in times:
                recent = [u for u in times if t - CONFIG.restart_window_s <= u <= t]
                assert len(recent) <= CONFIG.max_restarts


TestLifecycleModel = LifecycleModel.TestCase
TestLifecycleModel.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


def _one_holding() -> tuple[LifecycleModel, Slot]:
    model = LifecycleModel()
    slot = model._slot(0)
    model.ready(0)
    assert slot.state == "holding"
    return model, slot


def test_a_stall_of_the_supervisor_is_not_a_hang() -> None:
    model, slot = _one_holding()
    try:
        model._advance(1.5)  # heartbeat age 1.5 of 2 s
        model.now += 5.0  # SIGSTOPped; nothing was read meanwhile
        model.life.discount(5.0)
        model._loop_step()
        assert slot.state == "holding", "the stall is discounted"
        model._advance(0.9)  # within the resume grace (1 s): still not judged
        assert slot.state == "holding" and slot.restarts == 0
        model._advance(0.2)  # no heartbeat after all: a real hang, caught
        assert slot.restarts == 1 and "no heartbeat for" in (slot.error or "")
    finally:
        model.teardown()


def test_a_refused_set_is_not_kept_and_an_unfit_vram_is_dropped_at_restart() -> None:
    model, slot = _one_holding()
    try:
        slot.overrides_before_set = {"mode": "sm"}
        slot.overrides = {"mode": "sm", "vram": "2GiB"}
        model.life.on_message(slot, {"t": "error", "message": "set refused: x", "refused": "set"})
        assert slot.overrides == {"mode": "sm"}
        slot.overrides["vram"] = 2**31  # above the 1 GiB the worker reported
        model.crash(0, 3)
        model._advance(1.0)
        assert slot.incarnation == 2 and "vram" not in slot.overrides
        assert slot.overrides == {"mode": "sm"}
    finally:
        model.teardown()


def test_command_handlers_do_not_import_the_event_loop() -> None:
    import ast

    import keepgpu.supervisor.commands as commands

    tree = ast.parse(Path(commands.__file__).read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "keepgpu.supervisor.loop" not in names
    assert not any(name and name.endswith(".loop") for name in names)
