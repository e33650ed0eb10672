"""CPU level: control round trip of `status` with 64 fake workers, 1000 calls each way.

client: keepgpu.client.Client (what keepgpu-ctl and keepgpu.hold use): a new ZeroMQ context,
  DEALER socket and connection (with the ZAP uid check) per call.
persistent: one DEALER socket kept open, the same v1 request frames: the supervisor's own
  service time plus one ipc hop.
cli: `keepgpu-ctl status --json` as a process (20 calls, for information: includes Python start).
Both socket ways are measured twice: with the 64 workers running (on a small machine they
compete with the supervisor for the CPU) and with the workers frozen by SIGSTOP for the few
seconds of the calls (the supervisor's own latency; well below --hang-timeout).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import zmq
from common import (
    Supervisor,
    aim,
    arg_parser,
    kill_pids,
    log,
    summary,
    utc_now,
    wait_quiet,
    write_result,
)

from keepgpu.client import Client
from keepgpu.protocol.control import decode_reply, encode_request

CALLS = 1000
CLI_CALLS = 20
GPUS = 64


def rtt_client(endpoint: str, n: int) -> list[float]:
    client = Client(endpoint, timeout=5.0)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.call("status")
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def rtt_persistent(endpoint: str, n: int) -> tuple[list[float], int]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    out = []
    size = 0
    try:
        for i in range(n):
            t0 = time.perf_counter()
            sock.send_multipart([b"", encode_request("status", None, i)])
            if not sock.poll(5000):
                raise RuntimeError("no reply within 5 s")
            frames = sock.recv_multipart()
            out.append((time.perf_counter() - t0) * 1000.0)
            reply = decode_reply(frames[-1])
            assert reply["ok"] and reply["id"] == i, reply
            size = len(frames[-1])
    finally:
        sock.close(linger=0)
        ctx.term()
    return out, size


def rtt_cli(sup: Supervisor, n: int) -> list[float]:
    argv = [sys.executable, "-m", "keepgpu.cli.ctl", "--endpoint", sup.endpoint, "status",
            "--json"]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, env=sup.env, check=True, stdout=subprocess.DEVNULL)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


@contextlib.contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    """SIGSTOP `pids` for the duration of the block; SIGCONT whatever happens."""
    kill_pids(pids, signal.SIGSTOP)
    try:
        yield
    finally:
        kill_pids(pids, signal.SIGCONT)


def timed(sup: Supervisor, fn: Callable[[], list[float]]) -> tuple[list[float], float]:
    """Run `fn`; also return the supervisor's CPU milliseconds per call during it."""
    proc = psutil.Process(sup.pid)
    c0 = sum(proc.cpu_times()[:2])
    out = fn()
    return out, (sum(proc.cpu_times()[:2]) - c0) * 1000.0 / len(out)


def measure() -> dict[str, Any]:
    with Supervisor(GPUS) as sup:
        sup.wait_ready(timeout=120)
        pids = [g["pid"] for g in sup.status()["gpus"]]
        time.sleep(5.0)
        rtt_client(sup.endpoint, 20)  # warm-up
        client, cpu_client = timed(sup, lambda: rtt_client(sup.endpoint, CALLS))
        persistent, cpu_pers = timed(sup, lambda: rtt_persistent(sup.endpoint, CALLS)[0])
        with frozen(pids):
            client_q = rtt_client(sup.endpoint, CALLS)
        time.sleep(3.0)  # let heartbeats catch up
        with frozen(pids):
            persistent_q, size = rtt_persistent(sup.endpoint, CALLS)
        cli = rtt_cli(sup, CLI_CALLS)
        time.sleep(2.0)
        st = sup.status()
    return {
        "label": f"{GPUS} workers",
        "tool": "keepgpu",
        "config": {"engine": "fake", "gpus": GPUS, "calls": CALLS, "cli_calls": CLI_CALLS},
        "metrics": {
            "status_client_ms": summary(client, 3),
            "status_persistent_ms": summary(persistent, 3),
            "status_client_workers_frozen_ms": summary(client_q, 3),
            "status_persistent_workers_frozen_ms": summary(persistent_q, 3),
            "status_cli_process_ms": summary(cli, 1),
            "supervisor_cpu_ms_per_status_client": round(cpu_client, 3),
            "supervisor_cpu_ms_per_status_persistent": round(cpu_pers, 3),
            "status_reply_bytes": size,
            "holding_at_end": sum(g["state"] == "holding" for g in st["gpus"]),
            "restarts_at_end": sum(g["restarts"] for g in st["gpus"]),
        },
        "series": {"client_ms": [round(x, 3) for x in client],
                   "persistent_ms": [round(x, 3) for x in persistent],
                   "client_workers_frozen_ms": [round(x, 3) for x in client_q],
                   "persistent_workers_frozen_ms": [round(x, 3) for x in persistent_q]},
    }


def main() -> None:
    args = arg_parser(__doc__ or "").parse_args()
    wait_quiet()
    started = utc_now()
    tool = measure()
    m = tool["metrics"]
    for key in ("status_client_ms", "status_persistent_ms", "status_client_workers_frozen_ms",
                "status_persistent_workers_frozen_ms"):
        log(f"{key}: p50 {m[key]['p50']} p99 {m[key]['p99']}")
    aims = [aim("status p99 over 1000 calls, 64 workers (keepgpu.client.Client)",
                m["status_client_ms"]["p99"], 5.0, "ms")]
    notes = [
        "times in milliseconds, measured with time.perf_counter around each call",
        "supervisor_cpu_ms_per_status_*: the supervisor's CPU time during the 1000 calls / 1000 "
        "(includes its background heartbeat handling over that time)",
    ]
    write_result(args.out, "cpu_rtt", "cpu", [tool], aims, notes=notes, started=started)


if __name__ == "__main__":
    main()
