"""systemd notification: READY=1 once every GPU holds, WATCHDOG=1 while the loop turns,
STOPPING=1 on release."""

from __future__ import annotations

import socket
import time

from kgtest import Sup


def test_sd_notify_ready_watchdog_and_stopping(start_sup, runtime_dir):
    path = runtime_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    try:
        sup: Sup = start_sup("--gpus", "0,1", "--heartbeat", "0.2",
                             env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        seen: list[str] = []
        deadline = time.monotonic() + 30
        # Watchdog pings start at once; READY only once the workers hold (slow on a busy host).
        while time.monotonic() < deadline and (
            "READY=1" not in seen or seen.count("WATCHDOG=1") < 3
        ):
            try:
                seen.extend(sock.recv(4096).decode().splitlines())
            except TimeoutError:
                pass
        assert "READY=1" in seen
        assert any(line.startswith("STATUS=2/2 GPUs holding") for line in seen)
        assert seen.count("WATCHDOG=1") >= 3
        assert [g["state"] for g in sup.gpus()] == ["holding", "holding"], "READY after holding"
        sup.call("stop", timeout=15)
        stopping = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not stopping:
            try:
                stopping = "STOPPING=1" in sock.recv(4096).decode().splitlines()
            except TimeoutError:
                pass
        assert stopping
    finally:
        sock.close()
