"""Runtime directory and endpoint rules shared by the supervisor and its clients.

`$KEEPGPU_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/keepgpu`, else `/tmp/keepgpu-<uid>`; created 0700
and refused when it is a symlink, owned by someone else, or group/other accessible.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

# sun_path is 108 bytes on Linux including the terminating NUL.
MAX_IPC_PATH = 107
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RuntimeDirError(Exception):
    """The runtime directory or a name derived from it cannot be used safely (exit 78)."""


def default_runtime_dir() -> Path:
    env = os.environ.get("KEEPGPU_RUNTIME_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    # Batch jobs often inherit the login node's XDG_RUNTIME_DIR, which does not exist on the
    # compute node: use it only when it is really there and ours.
    if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == os.getuid():
        return Path(xdg) / "keepgpu"
    return Path(f"/tmp/keepgpu-{os.getuid()}")


def validate_name(name: str) -> str:
    """A supervisor name: letters, digits, '_', '.', '-'; 1-64 chars; no leading dot or dash."""
    if not _NAME_RE.match(name):
        raise RuntimeDirError(
            f"invalid name {name!r}: use 1-64 letters, digits, '_', '.', '-' (not first)"
        )
    return name


def check_dir(path: Path) -> None:
    """Refuse a runtime dir that is a symlink, not ours, or accessible to group/other."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise RuntimeDirError(f"runtime dir {path} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeDirError(f"runtime dir {path} is not a directory")
    if st.st_uid != os.getuid():
        raise RuntimeDirError(f"runtime dir {path} is owned by uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & 0o077:
        raise RuntimeDirError(
            f"runtime dir {path} has mode {stat.S_IMODE(st.st_mode):o}; it must be 700"
        )


def ensure_dir(path: Path) -> Path:
    """Create the runtime dir 0700 (parents with default mode) and check it."""
    try:
        if not path.exists() and not path.is_symlink():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
        check_dir(path)
    except OSError as exc:
        raise RuntimeDirError(f"cannot use runtime dir {path}: {exc.strerror or exc}") from exc
    return path


@dataclass(frozen=True)
class Paths:
    """Files of one named supervisor inside the runtime dir."""

    dir: Path
    name: str

    def _file(self, suffix: str) -> Path:
        return self.dir / f"{self.name}.{suffix}"

    @property
    def control(self) -> Path:
        return self._file("ctl")

    @property
    def workers(self) -> Path:
        return self._file("workers")

    @property
    def lock(self) -> Path:
        return self._file("lock")

    @property
    def pidfile(self) -> Path:
        return self._file("pid")

    @property
    def logfile(self) -> Path:
        return self._file("log")

    @property
    def control_endpoint(self) -> str:
        return ipc_endpoint(self.control)

    @property
    def workers_endpoint(self) -> str:
        return ipc_endpoint(self.workers)


def ipc_endpoint(path: Path) -> str:
    """`ipc://<path>`, refusing paths longer than the kernel's sun_path allows."""
    raw = os.fsencode(str(path))
    if len(raw) > MAX_IPC_PATH:
        raise RuntimeDirError(
            f"ipc socket path is {len(raw)} bytes, over the {MAX_IPC_PATH}-byte limit: {path} "
            "(use a shorter --name or KEEPGPU_RUNTIME_DIR)"
        )
    return f"ipc://{path}"


def paths_for(name: str, runtime_dir: Path | None = None) -> Paths:
    """Paths of supervisor `name` (validated) under `runtime_dir` or the default dir."""
    return Paths(runtime_dir or default_runtime_dir(), validate_name(name))
