"""A hostile neighbour on the tcp control port: CURVE handshake floods (anyone may start one:
the server's public key is no secret), raw garbage and half-open connections."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from kgtest import Sup, wait_until

from keepgpu.protocol import keys

FAST = ["--heartbeat", "0.2", "--hang-timeout", "2", "--restart-delay", "0.1"]

# Two threads, each connecting 20 DEALERs with fresh CURVE keypairs at a time, for argv[3] s.
_FLOOD = """
import sys, threading, time, zmq
ep, server, seconds = sys.argv[1], sys.argv[2].encode(), float(sys.argv[3])
end = time.monotonic() + seconds
def flood():
    ctx = zmq.Context()
    while time.monotonic() < end:
        socks = []
        for _ in range(20):
            s = ctx.socket(zmq.DEALER); s.linger = 0
            s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
            s.curve_serverkey = server
            s.connect(ep); socks.append(s)
        time.sleep(0.05)
        for s in socks: s.close(0)
    ctx.term()
threads = [threading.Thread(target=flood) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
"""


@pytest.fixture
def own_keys(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KEEPGPU_KEYS_DIR", base_env["KEEPGPU_KEYS_DIR"])
    return Path(base_env["KEEPGPU_KEYS_DIR"])


def _tcp_sup(start_sup: Callable[..., Sup]) -> Sup:
    sup = start_sup("--gpus", "0", *FAST, "--control", "tcp://127.0.0.1:*")
    pidfile = sup.runtime / f"{sup.name}.pid"
    lines = wait_until(lambda: pidfile.exists() and pidfile.read_text().splitlines()[1:], 15)
    sup.endpoint = sup.client.endpoint = lines[0]
    sup.wait_states("holding")
    return sup


@pytest.fixture
def flood() -> Iterator[Callable[[Sup, float], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(sup: Sup, seconds: float) -> subprocess.Popen[bytes]:
        server = keys.own_keypair().public.decode()
        proc = subprocess.Popen([sys.executable, "-c", _FLOOD, sup.endpoint, server,
                                 str(seconds)], stdin=subprocess.DEVNULL)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _many_authorized_keys(own_keys: Path, count: int) -> None:
    keys.own_keypair()
    folder = own_keys / keys.AUTHORIZED_DIR
    folder.mkdir(mode=0o700)
    for i in range(count):
        public, _ = zmq.curve_keypair()
        (folder / f"k{i}.key").write_text(keys._cert(public, None))


def test_status_answers_and_sigterm_releases_during_a_handshake_flood(
    start_sup: Callable[..., Sup], own_keys: Path,
    flood: Callable[[Sup, float], subprocess.Popen[bytes]],
) -> None:
    """With 1000 authorized keys every status call used to time out under this flood, and the
    supervisor took over 20 s to act on SIGTERM (each handshake re-read 1000 files)."""
    _many_authorized_keys(own_keys, 1000)
    sup = _tcp_sup(start_sup)
    attacker = flood(sup, 4.0)
    time.sleep(1.0)
    for _ in range(3):
        assert sup.call("status", timeout=5)["gpus"][0]["state"] == "holding"
        time.sleep(0.2)
    assert attacker.poll() is None, "the flood ended before the checks: they proved nothing"
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(15) == 0


def test_refused_handshakes_do_not_flood_the_log(
    start_sup: Callable[..., Sup], own_keys: Path,
    flood: Callable[[Sup, float], subprocess.Popen[bytes]],
) -> None:
    sup = _tcp_sup(start_sup)
    flood(sup, 2.0).wait(20)
    assert sup.call("ping", timeout=5)
    refused = sup.log().count("refused a control peer")
    assert refused <= 20, f"{refused} log lines for one flood"


def test_garbage_and_half_open_connections_do_not_stop_control(
    start_sup: Callable[..., Sup], own_keys: Path
) -> None:
    sup = _tcp_sup(start_sup)
    port = int(sup.endpoint.rsplit(":", 1)[1])
    conns = []
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            conns.append(s)
            if i % 4 == 0:  # a ZMTP greeting asking for CURVE, then junk
                s.sendall(b"\xff" + b"\0" * 8 + b"\x7f\x03\x00CURVE" + b"\0" * 15 + os.urandom(300))
            elif i % 4 == 1:
                s.sendall(os.urandom(64))
            elif i % 4 == 2:  # a length prefix far beyond MAXMSGSIZE
                s.sendall(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f")
            # i % 4 == 3: connected, silent (half-open handshake)
        for _ in range(3):
            assert sup.call("status", timeout=5)["gpus"][0]["state"] == "holding"
    finally:
        for s in conns:
            s.close()
    assert sup.proc.poll() is None
    assert sup.call("ping", timeout=5)
