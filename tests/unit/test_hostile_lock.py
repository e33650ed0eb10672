"""Lock files in shared directories, made first by someone else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import keepgpu.supervisor.lock as lock_mod
from keepgpu.protocol.runtime import paths_for
from keepgpu.supervisor.lock import InstanceLock


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another uid")
def test_an_endpoint_lock_made_by_another_uid_is_named_with_its_owner(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    squat = shared / "x.ctl.lock"
    squat.write_text("")
    os.chown(squat, 65534, 65534)
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    env = {**os.environ, "KEEPGPU_RUNTIME_DIR": str(rt), "KEEPGPU_ENGINE": "fake"}
    proc = subprocess.run(
        [sys.executable, "-m", "keepgpu.cli.supervise", "--control", f"ipc://{shared}/x.ctl"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 78
    # The file at fault and its owner, not the name lock (which was fine).
    assert proc.stderr.strip().splitlines() == [
        f"keepgpu-supervise: error: cannot take the lock {squat}: a regular file of uid 65534, "
        f"not ours ({os.getuid()}); remove it or use another endpoint"
    ]


def test_the_name_lock_file_goes_with_its_supervisor_and_comes_back_for_the_next(
    tmp_path: Path,
) -> None:
    paths = paths_for("n1", tmp_path)
    first = InstanceLock(paths)
    first.acquire()
    assert paths.lock.exists()
    first.release()
    assert not paths.lock.exists()
    second = InstanceLock(paths)
    second.acquire()
    assert paths.lock.exists()
    with pytest.raises(Exception, match="already running"):
        InstanceLock(paths).acquire()
    second.release()


def test_a_lock_taken_on_a_file_unlinked_meanwhile_is_retried(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The previous owner unlinks the name lock on release: a process that opened the old
    file just before must not believe it holds the name while a third one locks the new
    file."""
    paths = paths_for("n2", tmp_path)
    real_flock = lock_mod.fcntl.flock
    calls = []

    def flock_then_lose_the_race(fd: int, op: int) -> None:
        real_flock(fd, op)
        if not calls and os.fstat(fd).st_ino == os.stat(paths.lock).st_ino:
            calls.append(fd)
            os.unlink(paths.lock)  # the old owner releases: its file goes
            paths.lock.write_text("")  # and the next supervisor creates the new one

    monkeypatch.setattr(lock_mod.fcntl, "flock", flock_then_lose_the_race)
    held = InstanceLock(paths)
    held.acquire()
    try:
        assert os.fstat(held._fd).st_ino == os.stat(paths.lock).st_ino  # type: ignore[arg-type]
    finally:
        held.release()
