"""The faults the soak injects into a running supervisor (tests/soak/test_fault_soak.py):
worker signals, control commands (stops left in flight), bad requests, and, as an extra,
SIGSTOP of the supervisor itself."""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any, NoReturn

from kgtest import Sup
from soak_helpers import (
    EXTRA,
    SLACK_S,
    STATES,
    STATUS_BOUND_S,
    AsyncStop,
    Key,
    LifeConfig,
    Tracker,
    send_signal,
)

from keepgpu.client import CommandFailed, NoSupervisor


class Faults:
    """Fault injection; the soak (a subclass) provides the bookkeeping and the checks."""

    rng: random.Random
    sup: Sup | None
    cfg: LifeConfig | None
    tracker: Tracker
    gpus: list[dict[str, Any]]  # the last status
    stops: list[AsyncStop]
    conts: list[tuple[float, Key]]  # SIGCONTs due: (monotonic time, worker)
    stopped_by_us: set[Key]
    req_ids: int

    def note(self, kind: str, detail: str = "", count: bool = True) -> None:
        raise NotImplementedError

    def fail(self, what: str) -> NoReturn:
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError

    def worker(self, states: tuple[str, ...] | None = None) -> tuple[dict[str, Any], Key] | None:
        cands = [g for g in self.gpus if g["pid"] and (states is None or g["state"] in states)]
        if not cands:
            return None
        g = self.rng.choice(cands)
        key = self.tracker.key_of(g["pid"])
        return (g, key) if key else None

    def inject(self) -> None:
        kinds = ["worker_sigkill"] * 3 + ["worker_sigstop"] * 2 + ["stop_gpu"] * 2 + [
            "start_gpu"] * 2 + ["pause", "resume", "set", "bad_request"]
        if "sup_sigstop" in EXTRA:
            kinds.append("sup_sigstop")
        kind = self.rng.choice(kinds)
        getattr(self, "f_" + kind)()

    def f_worker_sigkill(self) -> None:
        picked = self.worker()
        if picked and send_signal(picked[1], signal.SIGKILL):
            self.note("worker_sigkill", f"gpu {picked[0]['gpu']} pid {picked[1][0]}")

    def f_worker_sigstop(self) -> None:
        # Only workers past READY: a worker stopped in its first ~30 ms has not armed
        # PDEATHSIG yet (the stop_at_spawn extra covers that window).
        picked = self.worker(("holding", "backoff"))
        if picked and send_signal(picked[1], signal.SIGSTOP):
            self.stopped_by_us.add(picked[1])
            self.note("worker_sigstop", f"gpu {picked[0]['gpu']} pid {picked[1][0]}")
            if self.rng.random() < 0.6:  # else the hang detector has to deal with it
                self.conts.append((time.monotonic() + self.rng.uniform(0.05, 1.5), picked[1]))

    def due_conts(self) -> None:
        now = time.monotonic()
        for due, key in [c for c in self.conts if c[0] <= now]:
            self.conts.remove((due, key))
            if send_signal(key, signal.SIGCONT):
                self.note("worker_sigcont", f"pid {key[0]}")

    def some_gpus(self) -> list[int]:
        assert self.cfg is not None
        return sorted(self.rng.sample(self.cfg.gpus, self.rng.randint(1, len(self.cfg.gpus))))

    def f_stop_gpu(self) -> None:
        assert self.sup is not None and self.cfg is not None
        gpus = self.some_gpus()
        if len(gpus) == len(self.cfg.gpus):
            gpus = gpus[:1]  # a stop naming every GPU is a partial stop too; keep it small
        self.req_ids += 1
        bound = self.cfg.release_bound + SLACK_S
        self.stops.append(AsyncStop(self.sup.endpoint, gpus, self.req_ids, bound))
        self.note("stop_gpu", f"gpus {gpus}")

    def f_start_gpu(self) -> None:
        assert self.sup is not None
        args = {"gpus": self.some_gpus()} if self.rng.random() < 0.8 else None
        try:
            result = self.sup.call("start", args, timeout=STATUS_BOUND_S)
        except CommandFailed as exc:
            if exc.code != "conflict":  # an unkillable GPU cannot be started
                self.fail(f"start {args}: {exc}")
            result = {"gpus": exc.message}
        except NoSupervisor as exc:
            self.fail(f"start unanswered: {exc}")
        self.note("start_gpu", f"{args} -> {result['gpus']}")

    def control(self, cmd: str, args: dict[str, Any]) -> None:
        assert self.sup is not None
        try:
            result = self.sup.call(cmd, args, timeout=STATUS_BOUND_S)
        except CommandFailed as exc:
            # pause/set naming a stopped or fatal GPU, or `set vram` before the GPU's total is
            # known, are refused (docs/protocol.md): legitimate, and nothing is stored.
            if exc.code != "conflict" or cmd == "resume":
                self.fail(f"{cmd} {args}: {exc!r}")
            self.note(cmd, f"{args} -> refused: {exc.message}")
            return
        except NoSupervisor as exc:
            self.fail(f"{cmd} {args}: {exc!r}")
        if any(g["state"] not in STATES for g in result["gpus"]):
            self.fail(f"{cmd}: undocumented state in {result}")
        self.note(cmd, f"{args} -> {[(g['gpu'], g['applied']) for g in result['gpus']]}")

    def f_pause(self) -> None:
        args: dict[str, Any] = {"gpus": self.some_gpus()}
        if self.rng.random() < 0.5:
            args["seconds"] = round(self.rng.uniform(0.1, 2.0), 2)
        self.control("pause", args)

    def f_resume(self) -> None:
        self.control("resume", {"gpus": self.some_gpus()} if self.rng.random() < 0.7 else {})

    def f_set(self) -> None:
        choices = {
            "target_util": lambda: self.rng.randint(1, 100),
            "mode": lambda: self.rng.choice(["duty", "sm", "compute", "pstate"]),
            "vram": lambda: self.rng.choice(["32MiB", "64MiB", "128MiB", "1%"]),
            "busy_threshold": lambda: self.rng.choice([-1, 10, 50]),
            "max_temp": lambda: self.rng.randint(60, 90),
        }
        keys = self.rng.sample(sorted(choices), self.rng.randint(1, 3))
        args: dict[str, Any] = {k: choices[k]() for k in keys}
        if self.rng.random() < 0.7:
            args["gpus"] = self.some_gpus()
        self.control("set", args)

    def f_bad_request(self) -> None:
        """Bad input gets an error reply and changes nothing (the next check proves it)."""
        assert self.sup is not None
        cmd, args, code = self.rng.choice([
            ("stop", {"gpus": [7]}, "not_found"),
            ("set", {"target_util": 0}, "invalid_argument"),
            ("set", {"vram": "10XB"}, "invalid_argument"),
            ("pause", {"seconds": -1}, "invalid_argument"),
            ("frobnicate", {}, "unknown_command"),
        ])
        try:
            self.sup.call(cmd, args, timeout=STATUS_BOUND_S)
        except CommandFailed as exc:
            if exc.code != code:
                self.fail(f"{cmd} {args}: {exc.code}, expected {code}")
        except NoSupervisor as exc:
            self.fail(f"{cmd} {args} unanswered: {exc}")
        else:
            self.fail(f"{cmd} {args} was accepted")
        self.note("bad_request", f"{cmd} {args}")

    def f_sup_sigstop(self) -> None:
        """SIGSTOP the supervisor past the hang timeout: on SIGCONT, workers that heartbeat
        all along must be kept (their heartbeats wait in the socket)."""
        assert self.sup is not None and self.cfg is not None
        before = {g["gpu"]: g for g in self.gpus if g["state"] in ("holding", "backoff")}
        os.kill(self.sup.pid, signal.SIGSTOP)
        frozen = self.rng.uniform(self.cfg.hang + 0.2, self.cfg.hang + 1.0)
        time.sleep(frozen)
        os.kill(self.sup.pid, signal.SIGCONT)
        self.note("sup_sigstop", f"{frozen:.2f}s, hang timeout {self.cfg.hang}")
        for st in self.stops:
            st.deadline += frozen
        time.sleep(self.cfg.hang)
        self.check()
        now = {g["gpu"]: g for g in self.gpus}
        for gpu, g in before.items():
            entry, inc = str(gpu), g["incarnation"]
            ours = {k[0] for k in self.stopped_by_us}
            if (entry, inc) in self.cfg.timed or g["pid"] in ours:
                continue
            if now[gpu]["incarnation"] != inc:
                self.fail(f"healthy gpu {gpu} (pid {g['pid']}, inc {inc}) was replaced after "
                          f"SIGSTOP/SIGCONT of the supervisor: now {now[gpu]}")
