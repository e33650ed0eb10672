"""CURVE key files (layout, permissions) and control endpoint syntax."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.utils import z85

from keepgpu.protocol import keys
from keepgpu.protocol.endpoint import EndpointError, parse


@pytest.fixture
def kdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cfg" / "keepgpu"
    monkeypatch.setenv("KEEPGPU_KEYS_DIR", str(path))
    return path


def test_keypair_is_created_private_on_first_use_and_then_reused(kdir: Path) -> None:
    first = keys.own_keypair()
    assert stat.S_IMODE(os.stat(kdir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(kdir / keys.SECRET_FILE).st_mode) == 0o600
    assert zmq.curve_public(first.secret) == first.public
    assert keys.own_keypair() == first
    # ZeroMQ's own certificate reader understands our files (third-party clients use it).
    assert zmq.auth.load_certificate(kdir / keys.SECRET_FILE) == (first.public, first.secret)
    assert zmq.auth.load_certificate(kdir / keys.PUBLIC_FILE) == (first.public, None)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_secret_others_can_read_is_refused(kdir: Path, mode: int) -> None:
    keys.own_keypair()
    os.chmod(kdir / keys.SECRET_FILE, mode)
    with pytest.raises(keys.KeyFileError, match=f"mode {mode:o}"):
        keys.own_keypair()


def test_a_group_writable_keys_dir_and_a_symlinked_secret_are_refused(kdir: Path) -> None:
    keys.own_keypair()
    os.chmod(kdir, 0o770)
    with pytest.raises(keys.KeyFileError, match="mode 770"):
        keys.own_keypair()
    os.chmod(kdir, 0o700)
    secret = kdir / keys.SECRET_FILE
    os.rename(secret, kdir / "real")
    os.symlink(kdir / "real", secret)
    with pytest.raises(keys.KeyFileError, match="symlink"):
        keys.own_keypair()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_a_secret_of_another_user_is_refused(kdir: Path) -> None:
    keys.own_keypair()
    os.chown(kdir / keys.SECRET_FILE, 65534, 65534)
    with pytest.raises(keys.KeyFileError, match="owned by uid 65534"):
        keys.own_keypair()


def test_authorized_keys_are_ours_plus_safe_files_in_the_directory(kdir: Path) -> None:
    own = keys.own_keypair()
    folder = kdir / keys.AUTHORIZED_DIR
    folder.mkdir(mode=0o700)
    good, _ = zmq.curve_keypair()
    bad, _ = zmq.curve_keypair()
    (folder / "laptop.key").write_text(f'curve\n    public-key = "{good.decode()}"\n')
    (folder / "open.key").write_text(f'curve\n    public-key = "{bad.decode()}"\n')
    os.chmod(folder / "open.key", 0o666)
    (folder / "junk.key").write_text("nothing here\n")
    (folder / "notes.txt").write_text(f'public-key = "{bad.decode()}"\n')
    allowed, problems = keys.authorized_keys(own)
    assert allowed == {z85.decode(own.public), z85.decode(good)}
    assert len(problems) == 2 and any("open.key" in p and "mode 666" in p for p in problems)


def test_server_key_is_our_own_unless_a_host_file_says_otherwise(kdir: Path) -> None:
    own = keys.own_keypair()
    assert keys.server_public_key("node7", own) == own.public
    other, _ = zmq.curve_keypair()
    (kdir / keys.SERVERS_DIR).mkdir()
    (kdir / keys.SERVERS_DIR / "node7.key").write_text(f'public-key = "{other.decode()}"\n')
    assert keys.server_public_key("node7", own) == other
    assert keys.server_public_key("node8", own) == own.public


@pytest.mark.parametrize(
    ("text", "kind", "host", "port"),
    [("tcp://127.0.0.1:5555", "tcp", "127.0.0.1", "5555"), ("tcp://node-7.cluster:*", "tcp",
     "node-7.cluster", "*"), ("tcp://[::1]:9", "tcp", "::1", "9"), ("tcp://*:80", "tcp", "*", "80"),
     ("ipc:///tmp/x.ctl", "ipc", "", ""), ("ipc://@kg-abstract", "abstract", "", "")],
)
def test_good_endpoints(text: str, kind: str, host: str, port: str) -> None:
    ep = parse(text)
    assert (ep.kind, ep.host, ep.port) == (kind, host, port)


@pytest.mark.parametrize(
    "text",
    ["tcp://127.0.0.1:5555/x", "tcp://127.0.0.1:5555/", "tcp://127.0.0.1", "tcp://:5555",
     "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://eth0;127.0.0.1:5555",
     "tcp://[zz]:1", "tcp://h:1:2", "ipc://", "ipc://@", "udp://127.0.0.1:1", "127.0.0.1:1",
     "ipc:///" + "x" * 120],
)
def test_malformed_endpoints_are_refused(text: str) -> None:
    with pytest.raises(EndpointError):
        parse(text)
