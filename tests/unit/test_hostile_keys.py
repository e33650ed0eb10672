"""Key files and pid watches under careless or hostile conditions: racing creators, FIFOs where
key files should be, no home directory, pids beyond pid_t."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zmq

from keepgpu.protocol import keys
from keepgpu.supervisor import watch


@pytest.fixture
def kdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cfg" / "keepgpu"
    monkeypatch.setenv("KEEPGPU_KEYS_DIR", str(path))
    return path


def test_a_keypair_created_by_another_process_meanwhile_wins(
    kdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first uses at once (job steps on nodes sharing a home): both must end with the keys
    in the file, else one supervisor serves a key its clients do not expect, for ever."""
    theirs = zmq.curve_keypair()
    real = zmq.curve_keypair

    def racing_keypair() -> tuple[bytes, bytes]:
        # The other process writes its keypair between our exists() check and our write.
        (kdir / keys.SECRET_FILE).write_text(keys._cert(*theirs))
        os.chmod(kdir / keys.SECRET_FILE, 0o600)
        return real()

    monkeypatch.setattr(keys.zmq, "curve_keypair", racing_keypair)
    got = keys.own_keypair()
    assert got == keys.KeyPair(*theirs)
    assert keys.read_cert(kdir / keys.SECRET_FILE) == theirs
    assert not [p for p in kdir.iterdir() if p.name.endswith(".tmp")]


def test_a_stale_temporary_file_with_our_pid_does_not_stop_key_creation(kdir: Path) -> None:
    kdir.mkdir(parents=True, mode=0o700)
    (kdir / f".{keys.SECRET_FILE}.{os.getpid()}.tmp").write_text("half a key")
    pair = keys.own_keypair()
    assert keys.read_cert(kdir / keys.SECRET_FILE) == (pair.public, pair.secret)


def _with_fifo(path: Path, call: object) -> tuple[list[object], bool]:
    """Run `call()` in a thread against a FIFO at `path`; (its outcome, whether it finished
    within 5 s). A reader stuck on the FIFO is freed by opening its write end."""
    os.mkfifo(path, 0o600)
    out: list[object] = []

    def run() -> None:
        try:
            out.append(call())  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    finished = not t.is_alive()
    if not finished:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
    return out, finished


def test_a_fifo_in_authorized_keys_is_skipped_not_waited_on(kdir: Path) -> None:
    """The supervisor reads authorized_keys in its event loop at each CURVE handshake: a read
    that waits for a writer would stop it answering anything."""
    own = keys.own_keypair()
    (kdir / keys.AUTHORIZED_DIR).mkdir(mode=0o700)
    out, finished = _with_fifo(kdir / keys.AUTHORIZED_DIR / "pipe.key",
                               lambda: keys.authorized_keys(own))
    assert finished, "authorized_keys() blocked on a FIFO"
    allowed, problems = out[0]  # type: ignore[misc]
    assert allowed == {zmq.utils.z85.decode(own.public)}
    assert len(problems) == 1 and "not a regular file" in problems[0]


def test_a_fifo_as_the_secret_key_is_an_error_not_a_hang(kdir: Path) -> None:
    kdir.mkdir(parents=True, mode=0o700)
    out, finished = _with_fifo(kdir / keys.SECRET_FILE, keys.own_keypair)
    assert finished, "own_keypair() blocked on a FIFO"
    assert isinstance(out[0], keys.KeyFileError) and "not a regular file" in str(out[0])


def test_a_huge_key_file_is_refused_without_reading_it(kdir: Path) -> None:
    own = keys.own_keypair()
    (kdir / keys.AUTHORIZED_DIR).mkdir(mode=0o700)
    big = kdir / keys.AUTHORIZED_DIR / "big.key"
    with open(big, "wb") as fh:
        fh.truncate(1 << 30)  # sparse: costs no disk
    _, problems = keys.authorized_keys(own)
    assert len(problems) == 1 and "too big" in problems[0]


def test_keys_dir_pointing_at_a_file_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "afile"
    target.write_text("")
    monkeypatch.setenv("KEEPGPU_KEYS_DIR", str(target))
    with pytest.raises(keys.KeyFileError, match="not a directory"):
        keys.own_keypair()


def test_no_home_and_no_passwd_entry_is_a_key_error_not_a_keyerror(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Containers run uids without a passwd entry; Slurm prologs run without HOME."""
    for var in ("KEEPGPU_KEYS_DIR", "XDG_CONFIG_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)

    def no_entry(uid: int) -> object:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(keys.pwd, "getpwuid", no_entry)
    with pytest.raises(keys.KeyFileError, match="KEEPGPU_KEYS_DIR"):
        keys.own_keypair()


@pytest.mark.parametrize("pid", [2**31, 2**63, 99999999999])
def test_a_pid_beyond_pid_t_does_not_exist(pid: int) -> None:
    assert watch.exists(pid) is False
    w = watch.PidWatch(pid)
    assert w.fd is None and w.ended(set(), 0.0)


def test_exit_with_a_pid_beyond_pid_t_is_one_line_exit_78(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    env = {**os.environ, "KEEPGPU_RUNTIME_DIR": str(rt), "KEEPGPU_ENGINE": "fake"}
    proc = subprocess.run(
        [sys.executable, "-m", "keepgpu.cli.supervise", "--exit-with", "99999999999"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 78, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "keepgpu-supervise: error: --exit-with 99999999999: no such process"
    ]


def _key_file(folder: Path, name: str) -> bytes:
    public, _ = zmq.curve_keypair()
    (folder / name).write_text(keys._cert(public, None))
    return zmq.utils.z85.decode(public)


def test_authorized_keys_are_not_reread_at_every_handshake(
    kdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone who can reach a tcp port can start CURVE handshakes (the server key is public),
    and the supervisor asks for the allowed keys in its event loop at each one: with 1000
    files, ~1000 file reads per handshake stopped it answering status (measured: every status
    call timed out after 10 s under a 2-thread flood, and SIGTERM waited over 20 s)."""
    own = keys.own_keypair()
    folder = kdir / keys.AUTHORIZED_DIR
    folder.mkdir(mode=0o700)
    for i in range(50):
        _key_file(folder, f"k{i}.key")
    reads = []
    real = keys._read_small
    monkeypatch.setattr(keys, "_read_small", lambda p: reads.append(p) or real(p))
    now = [100.0]
    monkeypatch.setattr(keys, "_clock", lambda: now[0])
    first, _ = keys.authorized_keys(own)
    for _ in range(200):
        assert keys.authorized_keys(own)[0] == first
    assert len(reads) == 50
    now[0] += keys.REREAD_S  # a file edited in place is seen within REREAD_S
    keys.authorized_keys(own)
    assert len(reads) == 100


def test_a_key_added_or_removed_counts_at_once(kdir: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    own = keys.own_keypair()
    folder = kdir / keys.AUTHORIZED_DIR
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(keys, "_clock", lambda: 5.0)  # time stands still: only changes count
    keys.authorized_keys(own)
    added = _key_file(folder, "new.key")
    assert added in keys.authorized_keys(own)[0]
    (folder / "new.key").unlink()
    assert added not in keys.authorized_keys(own)[0]
    _key_file(folder, "other.key")
    os.chmod(folder, 0o777)  # now unsafe: refused at once, not after REREAD_S
    allowed, problems = keys.authorized_keys(own)
    assert allowed == {zmq.utils.z85.decode(own.public)} and "mode 777" in problems[0]
