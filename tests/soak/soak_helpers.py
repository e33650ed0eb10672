"""Pieces of the fault soak (tests/soak/test_fault_soak.py): a random per-life configuration,
tracking of every worker process a supervisor ever had, and stop requests left in flight."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import zmq

from keepgpu.protocol.control import decode_reply, encode_request

DEFAULT_FAULTS = 520
DEFAULT_BUDGET_S = 170.0  # for DEFAULT_FAULTS; the issue asks for >= 500 faults in <= 3 min
FAULTS = int(os.environ.get("KEEPGPU_SOAK_FAULTS", DEFAULT_FAULTS))
BUDGET_S = float(
    os.environ.get("KEEPGPU_SOAK_BUDGET_S", DEFAULT_BUDGET_S * max(1.0, FAULTS / DEFAULT_FAULTS))
)
# stop_at_spawn and late_sigterm hit bugs that are fixed now: on by default. sup_sigstop stays
# opt-in: on a host loaded far beyond its cores a truly slow worker can be replaced rightly.
_EXTRA_DEFAULT = "stop_at_spawn,late_sigterm"
EXTRA = {
    k.strip() for k in os.environ.get("KEEPGPU_SOAK_EXTRA", _EXTRA_DEFAULT).split(",") if k.strip()
}
KNOWN_EXTRA = {"sup_sigstop", "stop_at_spawn", "late_sigterm"}
SLACK_S = 4.0  # on top of every documented bound: a 2-core machine shared with other tests
STATUS_BOUND_S = 5.0

#: The documented slot states (README "GPU states", docs/protocol.md).
STATES = frozenset(
    {"starting", "holding", "backoff", "stopping", "stopped", "restarting", "fatal", "unkillable"}
)
OUTCOMES = frozenset({"released", "killed", "unkillable"})
Key = tuple[int, float]  # (pid, create time): survives pid reuse


@dataclass
class LifeConfig:
    """One supervisor life: its GPUs, small timeouts, and the fake-engine faults it carries."""

    gpus: list[int]
    heartbeat: float
    hang: float
    join: float
    kill: float
    env: dict[str, str] = field(default_factory=dict)
    # (device entry, incarnation) pairs that crash or hang on their own: they may be replaced
    # without any help from the soak.
    timed: set[tuple[str, int]] = field(default_factory=set)

    def args(self) -> list[str]:
        return [
            "--gpus", ",".join(map(str, self.gpus)),
            "--vram", "64MiB",
            "--heartbeat", f"{self.heartbeat:g}", "--hang-timeout", f"{self.hang:g}",
            "--join-timeout", f"{self.join:g}", "--kill-timeout", f"{self.kill:g}",
            "--start-timeout", "5", "--restart-delay", "0.05",
            "--max-restarts", "1000", "--restart-window", "300",
        ]

    @property
    def release_bound(self) -> float:
        """join + kill: the documented bound on a release, without slack."""
        return self.join + self.kill


def random_config(rng: random.Random) -> tuple[LifeConfig, list[str]]:
    """A life's configuration and the names of the fake-engine faults it carries."""
    gpus = sorted(rng.sample(range(4), rng.choice([2, 3])))
    hb = round(rng.uniform(0.2, 0.4), 2)
    cfg = LifeConfig(
        gpus=gpus,
        heartbeat=hb,
        hang=round(max(2 * hb, rng.uniform(1.0, 1.6)), 2),
        join=round(rng.uniform(0.5, 1.0), 2),
        kill=round(rng.uniform(0.5, 1.0), 2),
        env={"KEEPGPU_FAKE_GPUS": "4"},
    )
    kinds: list[str] = []
    entry = lambda: str(rng.choice(gpus))  # noqa: E731 - a one-line draw, used six times
    if rng.random() < 0.4:
        cfg.env["KEEPGPU_FAKE_IGNORE_STOP"] = f"{entry()}:1"
        kinds.append("env_ignore_stop")
    if rng.random() < 0.3:  # sometimes longer than the join timeout: then it is killed
        cfg.env["KEEPGPU_FAKE_RELEASE_DELAY"] = f"{entry()}:{rng.uniform(0.1, 1.5):.2f}"
        kinds.append("env_release_delay")
    if rng.random() < 0.3:
        cfg.env["KEEPGPU_FAKE_START_DELAY"] = f"{entry()}/1:{rng.uniform(0.3, 1.5):.2f}"
        kinds.append("env_start_delay")
    if rng.random() < 0.4:
        e = entry()
        cfg.env["KEEPGPU_FAKE_CRASH_AFTER"] = f"{e}/1:{rng.uniform(0.2, 1):.2f},{e}/2:0.3"
        cfg.timed |= {(e, 1), (e, 2)}
        kinds.append("env_crash")
    if rng.random() < 0.25:
        e, inc = entry(), rng.choice([1, 2])
        cfg.env["KEEPGPU_FAKE_HANG_AFTER"] = f"{e}/{inc}:0.3"
        cfg.timed.add((e, inc))
        kinds.append("env_hang")
    if rng.random() < 0.15:  # the second incarnation is a configuration error: fatal at once
        cfg.env["KEEPGPU_FAKE_EXIT_CONFIG"] = f"{entry()}/2:1"
        kinds.append("env_exit_config")
    return cfg, kinds


class Tracker:
    """Every worker process of one supervisor name: from status, from the supervisor's
    children, and from a scan of all processes for the workers endpoint on the command line
    (the runtime dir is private to the test, so the match is exact)."""

    def __init__(self, workers_endpoint: str) -> None:
        self.marker = workers_endpoint
        self.seen: set[Key] = set()

    def ours(self, proc: psutil.Process) -> bool:
        try:
            return self.marker in proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    def key_of(self, pid: int) -> Key | None:
        try:
            proc = psutil.Process(pid)
            key = (pid, proc.create_time())
        except psutil.NoSuchProcess:
            return None
        if not self.ours(proc):
            return None
        self.seen.add(key)
        return key

    def children(self, sup_pid: int) -> list[Key]:
        try:
            kids = psutil.Process(sup_pid).children()
        except psutil.NoSuchProcess:
            return []
        keys = []
        for kid in kids:
            key = self.key_of(kid.pid)
            if key:
                keys.append(key)
        return keys

    def scan(self) -> list[Key]:
        """Live (not zombie) worker processes of this name, wherever they are parented."""
        found = []
        for proc in psutil.process_iter(["cmdline", "status", "create_time"]):
            info = proc.info
            if self.marker in (info["cmdline"] or []) and info["status"] != psutil.STATUS_ZOMBIE:
                key = (proc.pid, info["create_time"])
                self.seen.add(key)
                found.append(key)
        return found


def send_signal(key: Key, sig: int) -> bool:
    """Signal the process `key` names, never a later process that reused its pid."""
    try:
        proc = psutil.Process(key[0])
        if proc.create_time() != key[1]:
            return False
        proc.send_signal(sig)  # psutil checks again that it is the same process
        return True
    except psutil.NoSuchProcess:
        return False


def describe(key: Key) -> str:
    try:
        proc = psutil.Process(key[0])
        return f"pid {key[0]} status {proc.status()} ppid {proc.ppid()} {' '.join(proc.cmdline())}"
    except psutil.NoSuchProcess:
        return f"pid {key[0]} (gone)"


class AsyncStop:
    """A `stop {gpus}` sent on its own DEALER socket and not waited for, so that faults go on
    while the release is in flight. `poll()` returns the reply once it is there."""

    def __init__(self, endpoint: str, gpus: list[int], req_id: int, bound_s: float) -> None:
        self.gpus = gpus
        self.req_id = req_id
        self.sent = time.monotonic()
        self.deadline = self.sent + bound_s
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.sock.send_multipart([b"", encode_request("stop", {"gpus": gpus}, req_id)])
        self.reply: dict[str, Any] | None = None

    def poll(self, wait_s: float = 0.0) -> dict[str, Any] | None:
        if self.reply is None and self.sock.poll(int(wait_s * 1000)):
            self.reply = decode_reply(self.sock.recv_multipart()[-1])
        return self.reply

    def close(self) -> None:
        self.sock.close(linger=0)
