"""Single-instance locks, held for the supervisor's life: a flock on `<name>.lock`, and one per
endpoint it binds.

ZeroMQ lets a second bind on the same ipc path succeed silently and steal new clients (libzmq
unlinks the old socket file), so every lock is taken BEFORE any bind; once we hold an endpoint's
lock, a socket file left there by a dead supervisor is stale and is removed. Endpoint locks:
- `ipc://PATH`: `PATH.lock`, next to the socket, so that supervisors with other names or other
  runtime dirs meet on the same file;
- `ipc://@NAME` and `tcp://HOST:PORT`: `ep-<hash>.lock` in the runtime dir (the kernel refuses a
  second bind of those anyway; the lock names the owner's pid); `tcp://HOST:*` needs none.
Each endpoint lock file holds its owner's pid, so a refusal can name it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from pathlib import Path

from keepgpu.protocol.endpoint import Endpoint, parse
from keepgpu.protocol.runtime import Paths


class AlreadyRunning(Exception):
    """Another live supervisor holds the name or the endpoint."""


class InstanceLock:
    def __init__(self, paths: Paths, control: str | None = None) -> None:
        self.paths = paths
        self._fd: int | None = None
        self._endpoints = [
            EndpointLock(control or paths.control_endpoint, paths.dir),
            EndpointLock(paths.workers_endpoint, paths.dir),
        ]

    def acquire(self) -> None:
        # The lock file is removed on release (a keeper of hold() has a name of its own: one
        # file per keeper would pile up), so a lock on an inode no longer there is retried.
        for _ in range(5):
            fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid = read_pid(self.paths.pidfile)
                who = f" (pid {pid})" if pid else ""
                raise AlreadyRunning(
                    f"a keepgpu supervisor named {self.paths.name!r} is already running{who}; "
                    "use --name to run another"
                ) from None
            if _is_at(fd, self.paths.lock):
                break
            os.close(fd)
        else:
            raise AlreadyRunning(f"the name {self.paths.name!r} is changing hands; retry")
        self._fd = fd
        try:
            for ep in self._endpoints:
                ep.acquire()
        except BaseException:
            self.release()
            raise
        self.publish(None)

    def publish(self, endpoint: str | None) -> None:
        """Write the pid file: the pid on the first line (shell scripts read only that), then
        the control endpoint once it is bound (with the port the kernel chose for `:*`)."""
        if endpoint and self._endpoints[0].path is None and endpoint.startswith("tcp://"):
            # Lock the port we got, so that `--control` with that port names our pid.
            got = EndpointLock(endpoint, self.paths.dir)
            got.acquire()
            self._endpoints.append(got)
        tmp = self.paths.pidfile.with_suffix(".pid.tmp")
        tmp.write_text(f"{os.getpid()}\n" + (f"{endpoint}\n" if endpoint else ""))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.paths.pidfile)

    def release(self) -> None:
        """Remove our files, then drop the lock (a successor may start right after)."""
        if self._fd is None:
            return
        for ep in reversed(self._endpoints):
            ep.release()
        for path in (self.paths.pidfile, self.paths.lock):
            path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


class EndpointLock:
    """The flock that makes an endpoint ours (see the module docstring)."""

    def __init__(self, endpoint: str, runtime_dir: Path) -> None:
        self.endpoint = endpoint
        self.ep: Endpoint = parse(endpoint)
        self.path: Path | None
        if self.ep.kind == "ipc":
            self.path = Path(self.ep.path + ".lock")
        elif self.ep.kind == "tcp" and self.ep.port == "*":
            self.path = None
        else:
            digest = hashlib.sha256(endpoint.encode()).hexdigest()[:16]
            self.path = runtime_dir / f"ep-{digest}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        if self.path is None:
            return
        for _ in range(5):
            fd = self._open_and_lock(self.path)
            # The previous owner unlinks the file on release: if ours is no longer the file at
            # that path we locked an orphan inode, and must try again on the new file.
            if _is_at(fd, self.path):
                break
            os.close(fd)
        else:
            raise AlreadyRunning(f"endpoint {self.endpoint} is changing hands; retry")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        if self.ep.kind == "ipc":
            _remove_stale_socket(Path(self.ep.path))

    def _open_and_lock(self, path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            # In a shared dir someone else may have made this file first: name it and whose.
            what = "a regular file" if stat.S_ISREG(st.st_mode) else "not a regular file"
            raise OSError(errno.EPERM, f"{what} of uid {st.st_uid}, not ours ({os.getuid()}); "
                          "remove it or use another endpoint", str(path))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int(os.pread(fd, 32, 0).split(b"\n", 1)[0])
            except ValueError:
                pid = 0
            os.close(fd)
            who = f"keepgpu supervisor pid {pid}" if pid else "another keepgpu supervisor"
            raise AlreadyRunning(f"endpoint {self.endpoint} is in use by {who}") from None
        return fd

    def release(self) -> None:
        if self._fd is None:
            return
        if self.ep.kind == "ipc":
            _remove_stale_socket(Path(self.ep.path))
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None


def _is_at(fd: int, path: Path) -> bool:
    """Whether open file `fd` is still the file at `path` (not unlinked or replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _remove_stale_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


def read_pid(path: Path) -> int | None:
    """The pid on the first line of a pid file, None when absent or unreadable."""
    try:
        return int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None
