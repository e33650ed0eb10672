"""The non-blocking log handler on a full disk (a 64 KiB tmpfs, mounted here as root)."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepgpu.logsink import NonBlockingHandler


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path = Path(tempfile.mkdtemp(prefix="kgfull", dir="/tmp"))
    try:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                          capture_output=True, timeout=10).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], capture_output=True, timeout=10)
    finally:
        os.rmdir(path)


def test_a_full_disk_drops_whole_lines_and_never_glues_two(tiny_fs: Path) -> None:
    """ENOSPC in the middle of a record left half a line, and the next line written (the
    "dropped" note) was glued to it: `...inc=1 statekeepgpu: 22 log line(s) dropped`."""
    fd = os.open(tiny_fs / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    handler = NonBlockingHandler(fd)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("kg-hostile-full")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(10):  # the log's last page is partly used: the next write may be short
            logger.warning("record %04d %s", i, "x" * 90)
        filler = tiny_fs / "filler"
        ffd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # fill every free page
            while os.write(ffd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(ffd)
        for i in range(10, 200):
            logger.warning("record %04d %s", i, "x" * 90)
        assert handler.dropped > 0, "the disk never filled: the test proved nothing"
        filler.unlink()
        logger.warning("after %s", "x" * 10)
    finally:
        logger.removeHandler(handler)
        handler.close()
        os.close(fd)
    lines = (tiny_fs / "log").read_text().splitlines()
    # The disk ran out inside a record: its first part stays (bytes cannot be taken back),
    # but on a line of its own; nothing is glued to it.
    cut = [line for line in lines if line.startswith("record ") and len(line) != 12 + 90]
    assert len(cut) <= 1
    dropped = "log line(s) dropped: the log stream was full"
    for line in lines:
        assert line.count("record") + line.count(dropped) + line.count("after") == 1, line
        assert line.startswith(("record ", "after ")) or line.endswith(dropped), line
    assert lines[-2].endswith(dropped)
    assert lines[-1] == "after " + "x" * 10
