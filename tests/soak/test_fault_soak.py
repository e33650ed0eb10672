"""A seeded randomized fault soak against real supervisors (fake engine, real ZeroMQ).

Supervisor "lives" of one name run in sequence, each with a few fake GPUs, small timeouts and
random fake-engine faults (crash, hang, ignore STOP, slow start, slow release, exit 78). Into
each life the soak injects random faults — worker SIGKILL/SIGSTOP/SIGCONT, stop/start/pause/
resume/set and bad requests interleaved with stops still in flight — then ends it at random:
the stop command, SIGTERM, SIGTERM twice, SIGINT, SIGHUP or SIGKILL, sometimes during start-up.

Checked all along: the supervisor answers status within a bound and only reports documented
states; stop replies come within join+kill (+slack) with outcomes released|killed|unkillable.
After every end: the supervisor exited within its bound, no worker it ever had survives
(pid + create time, from status, from its children and from a scan of every process), and the
next life — a same-name successor — starts and answers.

Environment:
  KEEPGPU_SOAK_SEED=N       replay a run (the seed is printed at the start and in every failure)
  KEEPGPU_SOAK_FAULTS=N     injected faults to reach (default 520)
  KEEPGPU_SOAK_BUDGET_S=S   time guard: no new life after S seconds (default scales with FAULTS)
  KEEPGPU_SOAK_EXTRA=a,b    faults aimed at bugs found earlier (default: stop_at_spawn,late_sigterm;
                            set it to "" to leave them out): `sup_sigstop`
                            (SIGSTOP the supervisor past the hang timeout, then SIGCONT: healthy
                            workers must keep running) and `stop_at_spawn` (SIGSTOP workers as
                            they spawn, then SIGKILL the supervisor: they must not survive it),
                            `late_sigterm` (a second SIGTERM after the release must not turn
                            the exit code into death by SIGTERM)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, NoReturn

import pytest
from kgtest import Sup, alive, wait_until
from soak_faults import Faults
from soak_helpers import (
    BUDGET_S,
    EXTRA,
    FAULTS,
    KNOWN_EXTRA,
    OUTCOMES,
    SLACK_S,
    STATES,
    STATUS_BOUND_S,
    AsyncStop,
    Key,
    LifeConfig,
    Tracker,
    describe,
    random_config,
    send_signal,
)

from keepgpu.client import CommandFailed, NoSupervisor

NAME = "soak"
END_SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sighup": signal.SIGHUP,
               "sigkill": signal.SIGKILL}

pytestmark = [pytest.mark.soak, pytest.mark.timeout(int(BUDGET_S) + 120),
              pytest.mark.xdist_group("long-faults")]


class Soak(Faults):
    def __init__(self, seed: int, start_sup: Any, runtime: Path) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.start_sup = start_sup
        self.tracker = Tracker(f"ipc://{runtime}/{NAME}.workers")
        self.counts: Counter[str] = Counter()  # injected faults by kind
        self.env_faults: Counter[str] = Counter()  # fake-engine faults configured, by kind
        self.ends: Counter[str] = Counter()
        self.exit_codes: Counter[int] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.events: deque[str] = deque(maxlen=40)
        self.t0 = time.monotonic()
        self.lives = 0
        self.orphans = 0
        self.late_sigterm_exits = 0
        self.workers_at_end = 0  # worker processes alive when an end began, summed
        self.sup: Sup | None = None
        self.cfg: LifeConfig | None = None
        self.stops: list[AsyncStop] = []
        self.conts: list[tuple[float, Key]] = []  # SIGCONTs due: (monotonic time, worker)
        self.stopped_by_us: set[Key] = set()
        self.gpus: list[dict[str, Any]] = []  # the last status
        self.req_ids = 1

    # ---- bookkeeping -----------------------------------------------------------------------

    def note(self, kind: str, detail: str = "", count: bool = True) -> None:
        if count:
            self.counts[kind] += 1
        self.events.append(f"{time.monotonic() - self.t0:7.2f}s life {self.lives} {kind} {detail}")

    def fail(self, what: str) -> NoReturn:
        log = self.sup.log()[-3000:] if self.sup else ""
        raise AssertionError(
            f"soak failure (seed {self.seed}; replay with KEEPGPU_SOAK_SEED={self.seed}): {what}\n"
            f"life {self.lives} config: {self.cfg}\nsummary: {self.summary()}\n"
            "recent events:\n  " + "\n  ".join(self.events) + f"\nsupervisor log tail:\n{log}"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "lives": self.lives, "faults": sum(self.counts.values()),
            "by_kind": dict(sorted(self.counts.items())), "env_faults": dict(self.env_faults),
            "ends": dict(self.ends), "exit_codes": dict(self.exit_codes),
            "stop_outcomes": dict(self.outcomes), "orphans": self.orphans,
            "late_sigterm_exits": self.late_sigterm_exits,
            "workers_at_end": self.workers_at_end,
            "wall_s": round(time.monotonic() - self.t0, 1), "extra": sorted(EXTRA),
        }

    # ---- invariants ------------------------------------------------------------------------

    def check(self) -> None:
        """The supervisor is alive, answers within a bound, and its states are documented."""
        sup = self.sup
        assert sup is not None
        if sup.proc.poll() is not None:
            self.fail(f"the supervisor exited {sup.proc.returncode} unasked")
        try:
            result = sup.call("status", timeout=STATUS_BOUND_S)
        except NoSupervisor as exc:
            self.fail(f"status unanswered: {exc}")
        if result["supervisor"]["state"] != "running":
            self.fail(f"supervisor state {result['supervisor']['state']!r} while not stopping")
        self.gpus = result["gpus"]
        for g in self.gpus:
            if g["state"] not in STATES:
                self.fail(f"undocumented state {g['state']!r} for gpu {g['gpu']}")
            if g["pid"]:
                self.tracker.key_of(g["pid"])
        self.tracker.children(sup.pid)
        self.collect_stops(final=False)

    def collect_stops(self, final: bool) -> None:
        """Check replies of stops in flight; each must come within its bound."""
        still = []
        for st in self.stops:
            reply = st.poll(0.5 if final else 0.0)
            if reply is None:
                if time.monotonic() > st.deadline:
                    self.fail(f"stop {st.gpus} unanswered {time.monotonic() - st.sent:.1f}s")
                still.append(st)
                continue
            st.close()
            if not reply["ok"]:
                self.fail(f"stop {st.gpus} failed: {reply}")
            for g in reply["result"]["gpus"]:
                if g["outcome"] not in OUTCOMES:
                    self.fail(f"stop outcome {g['outcome']!r}")
                self.outcomes[g["outcome"]] += 1
        self.stops = still

    # ---- lives -----------------------------------------------------------------------------

    def begin(self) -> Sup:
        self.cfg, kinds = random_config(self.rng)
        self.env_faults.update(kinds)
        self.lives += 1
        self.sup = self.start_sup(*self.cfg.args(), env=self.cfg.env, name=NAME)
        self.note("life", f"pid {self.sup.pid} {self.cfg.args()} {kinds}", count=False)
        return self.sup

    def answers(self, sup: Sup) -> None:
        """The successor of the same name starts and answers (stale lock/socket replaced)."""
        def pong() -> bool:
            if sup.proc.poll() is not None:
                self.fail(f"the successor exited {sup.proc.returncode} at start")
            try:
                return sup.call("ping", timeout=1.0)["pid"] == sup.pid
            except NoSupervisor:
                return False

        try:
            wait_until(pong, 20, interval=0.02)
        except AssertionError:
            self.fail("the successor did not answer ping within 20s")

    def life(self) -> None:
        sup = self.begin()
        if self.rng.random() < (0.4 if "stop_at_spawn" in EXTRA else 0.15):
            return self.startup_kill(sup)
        self.answers(sup)
        self.check()
        for _ in range(self.rng.randint(10, 30)):
            self.due_conts()
            self.inject()
            time.sleep(self.rng.uniform(0.0, 0.25))
            self.check()
        self.end(sup)

    def startup_kill(self, sup: Sup) -> None:
        """End the supervisor while it is still starting (workers spawning, no READY yet)."""
        assert self.cfg is not None
        freeze = "stop_at_spawn" in EXTRA and self.rng.random() < 0.5
        sig = signal.SIGKILL if freeze else self.rng.choice(list(END_SIGNALS.values()))
        # stop_at_spawn: SIGSTOP every worker the moment it appears, then SIGKILL the supervisor
        until = time.monotonic() + (5.0 if freeze else self.rng.uniform(0.0, 0.8))
        frozen: set[Key] = set()
        while time.monotonic() < until and sup.proc.poll() is None:
            for key in self.tracker.children(sup.pid):
                if freeze and key not in frozen and send_signal(key, signal.SIGSTOP):
                    frozen.add(key)
                    self.note("stop_at_spawn", f"pid {key[0]}")
            if freeze and len(frozen) == len(self.cfg.gpus):
                break
            time.sleep(0.002)
        t_end = time.monotonic()
        sup.proc.send_signal(sig)
        self.note("startup_kill", signal.Signals(sig).name)
        self.ends["startup_" + signal.Signals(sig).name] += 1
        self.finish(sup, t_end, any_code=True)

    def end(self, sup: Sup) -> None:
        assert self.cfg is not None
        kind = self.rng.choice(["stop", "sigterm", "sigterm2", "sigint", "sighup", "sigkill"])
        self.ends[kind] += 1
        if self.rng.random() < 0.5:  # most ends should meet workers (partial stops add up)
            try:
                sup.call("start", timeout=STATUS_BOUND_S)
            except CommandFailed:
                pass  # an unkillable GPU: it is ended with the rest
        self.workers_at_end += len(self.tracker.children(sup.pid))
        self.note("end_" + kind, count=False)
        t_end = time.monotonic()
        if kind == "stop":
            try:
                result = sup.call("stop", timeout=self.cfg.release_bound + SLACK_S)
            except (CommandFailed, NoSupervisor) as exc:
                self.fail(f"stop: {exc!r}")
            if result["exiting"] is not True:
                self.fail(f"a full stop did not say exiting: {result}")
            for g in result["gpus"]:
                if g["outcome"] not in OUTCOMES:
                    self.fail(f"stop outcome {g['outcome']!r}")
                self.outcomes[g["outcome"]] += 1
        elif kind == "sigterm2":
            sup.proc.send_signal(signal.SIGTERM)
            time.sleep(self.rng.uniform(0.0, 0.3))
            if sup.proc.poll() is None:
                sup.proc.send_signal(signal.SIGTERM)
        else:
            sup.proc.send_signal(END_SIGNALS[kind])
        self.finish(sup, t_end, killed=kind == "sigkill", late_sigterm=kind == "sigterm2")

    def finish(self, sup: Sup, t_end: float, any_code: bool = False, killed: bool = False,
               late_sigterm: bool = False) -> None:
        """After an end: the supervisor exits within its bound and no worker survives it."""
        assert self.cfg is not None
        bound = self.cfg.release_bound + SLACK_S
        try:
            code = sup.proc.wait(max(0.1, t_end + bound - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.fail(f"the supervisor did not exit within {bound:.1f}s of its end")
        self.exit_codes[code] += 1
        want = {-signal.SIGKILL} if killed else {0, 1}
        if late_sigterm and code == -signal.SIGTERM and "late_sigterm" not in EXTRA:
            # A SIGTERM that lands after the release, while Python finalizes, kills the
            # supervisor (finalization restores SIG_DFL): the known bug that
            # test_late_sigterm.py pins. The release itself is checked below all the same.
            self.late_sigterm_exits += 1
            want.add(code)
        if not any_code and code not in want:
            self.fail(f"supervisor exit code {code}, expected one of {sorted(want)}")
        if not killed:
            self.collect_stops(final=True)
            if self.stops and not any_code:
                self.fail(f"stops never answered before the supervisor exited: "
                          f"{[s.gpus for s in self.stops]}")
        for st in self.stops:
            st.close()
        self.stops, self.conts = [], []
        self.tracker.scan()
        survivors = lambda: [k for k in self.tracker.seen if alive(k)]  # noqa: E731
        try:
            wait_until(lambda: not survivors(), max(0.2, t_end + bound - time.monotonic()))
        except AssertionError:
            left = survivors()
            self.orphans += len(left)
            text = "; ".join(describe(k) for k in left)
            for key in left:
                send_signal(key, signal.SIGKILL)
            self.fail(f"{len(left)} worker(s) outlived the supervisor (exit {code}): {text}")
        self.tracker.seen = {k for k in self.tracker.seen if alive(k)}
        sup.cleanup()


def test_fault_soak(start_sup, runtime_dir) -> None:
    unknown = EXTRA - KNOWN_EXTRA
    assert not unknown, f"KEEPGPU_SOAK_EXTRA: unknown {sorted(unknown)}; known {KNOWN_EXTRA}"
    seed = int(os.environ.get("KEEPGPU_SOAK_SEED", random.SystemRandom().randrange(2**32)))
    print(f"\nfault soak: seed {seed} (KEEPGPU_SOAK_SEED={seed} replays), "
          f"{FAULTS} faults, budget {BUDGET_S:g}s, extra {sorted(EXTRA) or 'none'}")
    soak = Soak(seed, start_sup, runtime_dir)
    while sum(soak.counts.values()) < FAULTS and time.monotonic() - soak.t0 < BUDGET_S:
        soak.life()
    # The last end must leave the name usable too.
    last = soak.begin()
    soak.answers(last)
    soak.end(last)
    print(f"fault soak: {soak.summary()}")
    done = sum(soak.counts.values())
    if done < FAULTS:
        soak.fail(f"only {done} of {FAULTS} faults within the {BUDGET_S:g}s budget")
