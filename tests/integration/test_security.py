"""Who may control a supervisor: other uids over ipc and tcp (CURVE), keys, endpoint locks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kgtest import CTL, SUPERVISE, Sup, wait_until

from keepgpu.client import AuthFailed, Client
from keepgpu.protocol import keys

FAST = ["--heartbeat", "0.2", "--hang-timeout", "2", "--restart-delay", "0.1"]
REPO = Path(__file__).resolve().parents[2]
OTHER_UID = 65534
SETPRIV = ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups"]

# A raw pyzmq client (no keys): does a `ping` get an answer, and what does the monitor see?
RAW_PING = """
import json, sys, time, zmq
from zmq.utils.monitor import recv_monitor_message
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.linger = 0
mon = s.get_monitor_socket()
s.connect(sys.argv[1]); s.send_multipart([b"", b'{"v":1,"cmd":"stop"}'])
p = zmq.Poller(); p.register(s, zmq.POLLIN); p.register(mon, zmq.POLLIN)
events, answered, end = [], False, time.monotonic() + 2
while time.monotonic() < end and not answered:
    for sock, _ in p.poll(100):
        if sock is s: answered = True
        else: events.append(zmq.Event(recv_monitor_message(mon)["event"]).name)
print(json.dumps({"answered": answered, "events": events}))
"""


def _run(cmd: list[str], env: dict[str, str], timeout: float = 30
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def other_python() -> Iterator[tuple[str, str]]:
    """(interpreter, PYTHONPATH) that uid 65534 can run with pyzmq, click, psutil and this
    checkout's keepgpu. The test interpreter may live under /root (mode 0700): then try the
    system python3, with keepgpu (and, for the same Python version, our dependencies) copied
    to a world-readable temporary dir. Skips only when no interpreter works."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to act as another uid")
    top = Path(tempfile.mkdtemp(prefix="kgother", dir="/tmp"))
    src, deps = top / "src", top / "deps"
    shutil.copytree(REPO / "keepgpu", src / "keepgpu",
                    ignore=shutil.ignore_patterns("__pycache__"))
    deps.mkdir()
    for mod in ("zmq", "click", "psutil"):
        origin = Path(__import__(mod).__file__).parent  # type: ignore[arg-type]
        shutil.copytree(origin, deps / mod, ignore=shutil.ignore_patterns("__pycache__"))
        libs = origin.parent / f"py{mod}.libs"  # auditwheel's bundled libzmq
        if libs.is_dir():
            shutil.copytree(libs, deps / libs.name)
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
    probe = "import zmq, click, psutil, keepgpu.client; assert zmq.has('curve')"
    candidates = dict.fromkeys(
        p for p in ("/usr/bin/python3", shutil.which("python3"), sys.executable,
                    getattr(sys, "_base_executable", None)) if p)
    try:
        for py in candidates:
            for path in (str(src), f"{src}:{deps}"):
                env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": path}
                if _run([*SETPRIV, py, "-c", probe], env).returncode == 0:
                    yield py, path
                    return
        pytest.skip(f"no Python that uid {OTHER_UID} can run with pyzmq: tried {list(candidates)}")
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def as_other(other_python: tuple[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """as_other(args..., home=None) runs `python args` as uid 65534 (HOME=/nonexistent, or a
    home of its own)."""
    py, path = other_python

    def run(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": path,
               "HOME": str(home) if home else "/nonexistent"}
        return _run([*SETPRIV, py, *args], env)

    return run


@pytest.fixture
def other_home() -> Iterator[Path]:
    """A home dir of uid 65534's own (pytest's tmp dirs are private to root)."""
    home = Path(tempfile.mkdtemp(prefix="kgnobody", dir="/tmp"))
    os.chown(home, OTHER_UID, OTHER_UID)
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def own_keys(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """The keys dir of the supervisors started here, used by this process's clients too."""
    monkeypatch.setenv("KEEPGPU_KEYS_DIR", base_env["KEEPGPU_KEYS_DIR"])
    return Path(base_env["KEEPGPU_KEYS_DIR"])


def _tcp_sup(start_sup: Callable[..., Sup], *args: str) -> Sup:
    sup = start_sup("--gpus", "0", *FAST, "--control", "tcp://127.0.0.1:*", *args)
    pidfile = sup.runtime / f"{sup.name}.pid"
    lines = wait_until(lambda: pidfile.exists() and pidfile.read_text().splitlines()[1:], 15)
    assert pidfile.read_text().splitlines()[0] == str(sup.pid), "line 1 stays the pid"
    sup.endpoint = sup.client.endpoint = lines[0]
    sup.wait_states("holding")
    return sup


def test_tcp_port_star_is_reported_in_pid_file_and_status(start_sup, own_keys):
    sup = _tcp_sup(start_sup)
    assert sup.endpoint.startswith("tcp://127.0.0.1:") and not sup.endpoint.endswith(":*")
    assert sup.status()["supervisor"]["endpoint"] == sup.endpoint
    out = _run([*CTL, "--endpoint", sup.endpoint, "status", "--json"], sup.env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["supervisor"]["endpoint"] == sup.endpoint


def test_other_uid_cannot_use_tcp_control(start_sup, own_keys, as_other, other_home):
    sup = _tcp_sup(start_sup)
    # 1. No keys at all (NULL mechanism): the handshake fails, nothing is answered.
    raw = json.loads(as_other("-c", RAW_PING, sup.endpoint).stdout)
    # A NULL peer against a CURVE server: libzmq reports the mismatch as _PROTOCOL or
    # _NO_DETAIL depending on which side notices first; either way no answer ever comes.
    failed = [e for e in raw["events"] if e.startswith("HANDSHAKE_FAILED_")]
    assert not raw["answered"] and failed, raw
    # 2. keepgpu-ctl without a usable home: one line, exit 1, at once.
    t0 = time.monotonic()
    out = as_other("-m", "keepgpu.cli.ctl", "--endpoint", sup.endpoint, "--timeout", "3", "stop")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "CURVE keys" in out.stderr and time.monotonic() - t0 < 3 + 10
    # 3. Its own keypair, and even our public key (it is public): still refused by ZAP.
    home = other_home
    servers = home / ".config" / "keepgpu" / keys.SERVERS_DIR
    out = as_other("-m", "keepgpu.cli.ctl", "--endpoint", sup.endpoint, "--timeout", "3", "ping",
                   home=home)
    assert out.returncode == 1 and "CURVE handshake" in out.stderr, out.stderr
    subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                    "mkdir", "-p", str(servers)], check=True)
    shutil.copy(own_keys / keys.PUBLIC_FILE, servers / "127.0.0.1.key")
    os.chown(servers / "127.0.0.1.key", OTHER_UID, OTHER_UID)
    t0 = time.monotonic()
    out = as_other("-m", "keepgpu.cli.ctl", "--endpoint", sup.endpoint, "--timeout", "3", "stop",
                   home=home)
    assert out.returncode == 1, out.stderr
    assert "refused this client" in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 3 + 10
    assert "refused a control peer" in sup.log()
    assert sup.proc.poll() is None and sup.gpus()[0]["state"] == "holding", "nothing stopped"
    out = _run([*CTL, "--endpoint", sup.endpoint, "stop"], sup.env)
    assert out.returncode == 0 and "supervisor exited" in out.stdout, out.stderr


def test_other_uid_cannot_use_ipc_even_with_dir_and_socket_opened(start_sup, as_other):
    sup: Sup = start_sup("--gpus", "0", *FAST)
    sup.wait_states("holding")
    os.chmod(sup.runtime, 0o755)
    os.chmod(sup.runtime / f"{sup.name}.ctl", 0o666)
    raw = json.loads(as_other("-c", RAW_PING, sup.endpoint).stdout)
    assert not raw["answered"] and "HANDSHAKE_FAILED_AUTH" in raw["events"], raw
    out = as_other("-m", "keepgpu.cli.ctl", "--endpoint", sup.endpoint, "--timeout", "3", "stop")
    assert out.returncode == 1 and "refused this client" in out.stderr, out.stderr
    assert sup.proc.poll() is None and sup.call("ping")["pid"] == sup.pid


def test_a_client_with_an_unknown_key_fails_fast_then_an_authorized_key_gets_in(
        start_sup, own_keys, tmp_path, monkeypatch):
    sup = _tcp_sup(start_sup)
    laptop = tmp_path / "laptop-keys"
    monkeypatch.setenv("KEEPGPU_KEYS_DIR", str(laptop))
    (laptop / keys.SERVERS_DIR).mkdir(parents=True, mode=0o700)
    shutil.copy(own_keys / keys.PUBLIC_FILE, laptop / keys.SERVERS_DIR / "127.0.0.1.key")
    client = Client(sup.endpoint, timeout=5.0)
    t0 = time.monotonic()
    with pytest.raises(AuthFailed, match="refused this client"):
        client.call("ping")
    assert time.monotonic() - t0 < 5.0, "an auth failure, not a timeout"
    authorized = own_keys / keys.AUTHORIZED_DIR
    authorized.mkdir(mode=0o700)
    shutil.copy(laptop / keys.PUBLIC_FILE, authorized / "laptop.key")  # no restart needed
    assert client.call("ping")["pid"] == sup.pid
    client.close()


def test_unsafe_secret_is_refused_with_one_line(base_env, own_keys):
    keys.own_keypair()
    os.chmod(own_keys / keys.SECRET_FILE, 0o644)
    out = _run([*SUPERVISE, "--gpus", "0", "--control", "tcp://127.0.0.1:*"], base_env)
    assert out.returncode == 78 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "mode 644" in out.stderr
    out = _run([*CTL, "--endpoint", "tcp://127.0.0.1:9", "--timeout", "1", "ping"], base_env)
    assert out.returncode == 1 and "mode 644" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def _refused_by(sup: Sup, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {sup.pid}" in lines[0], out.stderr


def test_same_ipc_endpoint_under_another_name_or_dir_is_refused(start_sup, runtime_dir, base_env,
                                                                tmp_path):
    endpoint = f"ipc://{runtime_dir}/shared.sock"
    first: Sup = start_sup("--gpus", "0", *FAST, "--control", endpoint)
    first.endpoint = first.client.endpoint = endpoint
    first.wait_states("holding")
    other_dir = tmp_path / "rt2"
    other_dir.mkdir(mode=0o700)
    for env in (base_env, {**base_env, "KEEPGPU_RUNTIME_DIR": str(other_dir)}):
        out = _run([*SUPERVISE, "--name", "second", "--gpus", "0", "--control", endpoint], env)
        _refused_by(first, out)
        assert "in use" in out.stderr
    assert first.call("ping")["pid"] == first.pid, "the first one is still reachable"
    # Its default endpoint cannot be taken by another name either.
    default_ep = f"ipc://{runtime_dir}/{first.name}.workers"
    out = _run([*SUPERVISE, "--name", "third", "--gpus", "0", "--control", default_ep], base_env)
    _refused_by(first, out)


def test_abstract_ipc_endpoint_is_reachable_and_locked(start_sup, base_env):
    endpoint = f"ipc://@kg-{uuid.uuid4().hex[:12]}"
    sup: Sup = start_sup("--gpus", "0", *FAST, "--control", endpoint)
    sup.endpoint = sup.client.endpoint = endpoint
    sup.wait_states("holding")
    out = _run([*CTL, "--endpoint", endpoint, "ping"], base_env)
    assert out.returncode == 0 and f"pid {sup.pid}" in out.stdout, out.stderr
    out = _run([*SUPERVISE, "--name", "again", "--gpus", "0", "--control", endpoint], base_env)
    _refused_by(sup, out)


def test_tcp_port_taken_by_a_keeper_names_its_pid(start_sup, own_keys, base_env):
    sup = _tcp_sup(start_sup)
    out = _run([*SUPERVISE, "--name", "again", "--gpus", "0", "--control", sup.endpoint],
               base_env)
    _refused_by(sup, out)


def test_detach_line_reports_the_port_it_got(base_env, runtime_dir, own_keys):
    out = _run([*SUPERVISE, "--name", "bgt", "--gpus", "0", "--detach",
                "--control", "tcp://127.0.0.1:*"], base_env)
    endpoint = (runtime_dir / "bgt.pid").read_text().splitlines()[1] if out.returncode == 0 else ""
    try:
        assert out.returncode == 0, out.stderr
        assert f"control {endpoint};" in out.stdout and not endpoint.endswith(":*")
    finally:
        if endpoint:
            stop = _run([*CTL, "--endpoint", endpoint, "stop"], base_env)
            assert stop.returncode == 0, stop.stderr


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555/x", "tcp://127.0.0.1", "ipc://@"])
def test_malformed_endpoints_exit_78_with_one_line(base_env, endpoint):
    for cmd in ([*SUPERVISE, "--gpus", "0", "--control", endpoint],
                [*CTL, "--endpoint", endpoint, "ping"]):
        out = _run(cmd, base_env)
        assert out.returncode == 78, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
