"""`keepgpu-ctl metrics` and `keepgpu-exporter`: real fake-engine keepers, real ZeroMQ, real
HTTP over loopback; the exposition is read back with prometheus_client's own parser."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from kgtest import CTL, Sup, wait_until
from prometheus_client.parser import text_string_to_metric_families

EXPORTER = [sys.executable, "-m", "keepgpu.cli.exporter"]
GPU_LABELS = {"gpu", "UUID", "Hostname", "name", "user"}


def parse(text: str) -> dict[str, list[Any]]:
    """family name -> its samples (prometheus_client's parser: a format error raises)."""
    return {f.name: list(f.samples) for f in text_string_to_metric_families(text)}


def ours(samples: list[Any], name: str) -> list[Any]:
    """Samples of keeper `name` only (as root, other users' keepers on this host show up)."""
    return [s for s in samples if s.labels.get("name") == name]


def ctl_metrics(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([*CTL, *args, "metrics"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_metrics_of_every_keeper_match_their_status(start_sup: Any, base_env: dict[str, str]
                                                    ) -> None:
    a = start_sup("--gpus", "0,1", "--vram", "256MiB", env={"KEEPGPU_FAKE_GPUS": "2"})
    b = start_sup("--gpus", "0", "--vram", "128MiB", env={"KEEPGPU_FAKE_GPUS": "1"})
    a.wait_states("holding")
    b.wait_states("holding")
    fams = parse(ctl_metrics(base_env))
    assert all(n.startswith("keepgpu_") for n in fams)
    for sup, gpus, held in ((a, 2, 256 * 1024**2), (b, 1, 128 * 1024**2)):
        up = ours(fams["keepgpu_keeper_up"], sup.name)
        assert [s.value for s in up] == [1.0]
        assert up[0].labels["user"] == psutil.Process().username()
        assert up[0].labels["Hostname"] == socket.gethostname()
        status = {g["gpu"]: g for g in sup.gpus()}
        held_s = ours(fams["keepgpu_gpu_held_bytes"], sup.name)
        assert len(held_s) == gpus
        for s in held_s:
            assert set(s.labels) == GPU_LABELS
            assert s.labels["UUID"] == status[int(s.labels["gpu"])]["uuid"]
            assert s.value == held
        holding = [s for s in ours(fams["keepgpu_gpu_state"], sup.name) if s.value == 1.0]
        assert sorted(s.labels["state"] for s in holding) == ["holding"] * gpus
        own = ours(fams["keepgpu_gpu_own_utilization_ratio"], sup.name)
        assert len(own) == gpus and all(0.0 <= s.value <= 1.0 for s in own)  # a ratio
        restarts = ours(fams["keepgpu_gpu_restarts"], sup.name)
        assert [s.name for s in restarts] == ["keepgpu_gpu_restarts_total"] * gpus
        ages = ours(fams["keepgpu_gpu_heartbeat_age_seconds"], sup.name)
        assert len(ages) == gpus and all(0.0 <= s.value < 10.0 for s in ages)


def test_unknown_reading_is_absent_not_zero(start_sup: Any, base_env: dict[str, str]) -> None:
    """A device without utilization readings (fake `no-util`) has no utilization sample."""
    sup = start_sup("--gpus", "0", "--vram", "64MiB",
                    env={"KEEPGPU_FAKE_GPUS": "1", "KEEPGPU_FAKE_TELEMETRY": "no-util"})
    sup.wait_states("holding")
    wait_until(lambda: sup.gpus()[0]["mem_total_bytes"], 15)
    assert sup.gpus()[0]["util_pct"] is None
    fams = parse(ctl_metrics(base_env))
    assert ours(fams["keepgpu_gpu_utilization_ratio"], sup.name) == []
    assert len(ours(fams["keepgpu_gpu_memory_total_bytes"], sup.name)) == 1


def test_stale_socket_is_skipped_and_a_frozen_keeper_is_down(
        start_sup: Any, base_env: dict[str, str], runtime_dir: Path) -> None:
    """A socket file of a dead supervisor is not a keeper; a keeper that does not answer is
    `keepgpu_keeper_up 0` after --timeout, and the scrape still ends."""
    with socket.socket(socket.AF_UNIX) as ghost:  # a socket file nobody listens on any more
        ghost.bind(str(runtime_dir / "ghost.ctl"))
    (runtime_dir / "ghost.pid").write_text("4200000\n")  # above PID_MAX_LIMIT: never alive
    sup = start_sup("--gpus", "0", "--vram", "64MiB", env={"KEEPGPU_FAKE_GPUS": "1"})
    sup.wait_states("holding")
    os.kill(sup.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        fams = parse(ctl_metrics(base_env, "--timeout", "0.5"))
        took = time.monotonic() - t0
    finally:
        os.kill(sup.pid, signal.SIGCONT)
    assert ours(fams["keepgpu_keeper_up"], "ghost") == []
    assert [s.value for s in ours(fams["keepgpu_keeper_up"], sup.name)] == [0.0]
    assert ours(fams.get("keepgpu_gpu_held_bytes", []), sup.name) == []
    assert took < 30  # bounded (generous: a loaded host)


class Exporter:
    def __init__(self, env: dict[str, str], runtime: Path, *args: str) -> None:
        self.err_path = runtime / "exporter.stderr"
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*EXPORTER, *args], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._err)

    def url(self) -> str:
        def found() -> str | None:
            assert self.proc.poll() is None, self.err_path.read_text()
            m = re.search(r"serving (http://\S+/metrics)", self.err_path.read_text())
            return m.group(1) if m else None

        return str(wait_until(found, 30))

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._err.close()
        return self.proc.returncode


def test_exporter_serves_metrics_over_loopback(start_sup: Any, base_env: dict[str, str],
                                               runtime_dir: Path) -> None:
    sup: Sup = start_sup("--gpus", "0,1,2", "--vram", "64MiB", env={"KEEPGPU_FAKE_GPUS": "3"})
    sup.wait_states("holding")
    threads = psutil.Process(sup.pid).num_threads()
    exp = Exporter(base_env, runtime_dir, "--listen", "127.0.0.1:0")
    try:
        url = exp.url()
        assert url.startswith("http://127.0.0.1:")
        for _ in range(3):  # the exporter keeps its connection between scrapes
            with urllib.request.urlopen(url, timeout=20) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=")
                fams = parse(resp.read().decode())
        held = ours(fams["keepgpu_gpu_held_bytes"], sup.name)
        assert sorted(s.labels["gpu"] for s in held) == ["0", "1", "2"]
        assert [s.value for s in ours(fams["keepgpu_keeper_up"], sup.name)] == [1.0]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url.replace("/metrics", "/nope"), timeout=20)
        assert err.value.code == 404
        err.value.close()
        # Served from the exporter's own process: the supervisor grew no thread for it.
        assert psutil.Process(sup.pid).num_threads() == threads
    finally:
        code = exp.stop()
    assert code == 0, exp.err_path.read_text()


def test_exporter_on_a_port_in_use_is_one_line_exit_78(base_env: dict[str, str],
                                                       runtime_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([*EXPORTER, "--listen", f"127.0.0.1:{port}"], env=base_env,
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 78
    assert out.stderr.strip().splitlines() == [
        f"keepgpu-exporter: error: cannot listen on 127.0.0.1:{port}: address already in use"]


@pytest.mark.parametrize("listen", ["9464", "host:port", "127.0.0.1:70000"])
def test_exporter_bad_listen_is_usage_error(base_env: dict[str, str], listen: str) -> None:
    out = subprocess.run([*EXPORTER, "--listen", listen], env=base_env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "is not HOST:PORT" in out.stderr


def test_prometheus_client_stays_out_of_the_supervisor_and_other_commands(
        base_env: dict[str, str]) -> None:
    """Metrics are made by their own front ends only: neither the supervisor's modules nor
    keepgpu-ctl's other commands load prometheus_client."""
    code = ("import sys, keepgpu.cli.supervise, keepgpu.supervisor.loop, keepgpu.cli.ctl;"
            "print(sorted(m for m in sys.modules if m.startswith('prometheus_client')))")
    out = subprocess.run([sys.executable, "-c", code], env=base_env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
