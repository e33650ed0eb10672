"""Finding the keepers (supervisors) of this user, or as root of every user, and asking each
for its `status`: the shared front half of `keepgpu-ctl gpus`, `keepgpu-ctl metrics` and
`keepgpu-exporter`. Only a client of the control protocol: nothing here reaches into a
supervisor, and a supervisor does no extra work for it beyond answering `status`.

A keeper is a `<name>.ctl` socket in a runtime dir whose `<name>.pid` names a live process (a
socket file left by a dead supervisor is skipped without a connection attempt, which would
only time out). Runtime dirs: this user's (keepgpu.protocol.runtime); as root also every
`/tmp/keepgpu-<uid>` and `/run/user/<uid>/keepgpu`, each counted for the uid that owns it.
"""

from __future__ import annotations

import glob
import os
import pwd
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keepgpu.client import Client, CommandFailed, NoSupervisor
from keepgpu.protocol.runtime import (
    MAX_IPC_PATH,
    RuntimeDirError,
    default_runtime_dir,
    validate_name,
)

#: Where other users' runtime dirs live (root only); a pattern each, `*` = the uid.
ROOT_PATTERNS = ("/tmp/keepgpu-*", "/run/user/*/keepgpu")


@dataclass(frozen=True)
class Keeper:
    """One supervisor found on this node: its name, owner and control endpoint."""

    name: str
    uid: int
    user: str
    endpoint: str
    pid: int | None


@dataclass
class Polled:
    """A keeper and what its `status` said (None with `error` when it did not answer)."""

    keeper: Keeper
    status: dict[str, Any] | None
    error: str | None = None


def user_name(uid: int | None) -> str | None:
    """The login name of `uid`, else the uid as text; None for None."""
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None


def runtime_dirs(all_users: bool) -> list[Path]:
    """This user's runtime dir, and with `all_users` every user's that exists (deduplicated)."""
    dirs = [default_runtime_dir()]
    if all_users:
        for pattern in ROOT_PATTERNS:
            dirs.extend(Path(p) for p in sorted(glob.glob(pattern)))
    seen: set[Path] = set()
    out = []
    for d in dirs:
        real = Path(os.path.realpath(d))
        if real not in seen:
            seen.add(real)
            out.append(d)
    return out


def _dir_owner(path: Path) -> int | None:
    """The uid owning a usable runtime dir: a real directory, mode 0700 at most (as the
    supervisor makes it). None for anything else, which no supervisor of ours would use."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o077:
        return None
    return st.st_uid


def _owned(path: Path, uid: int, kind: Callable[[int], bool]) -> bool:
    """`path` is (not a symlink to) a file of that kind owned by `uid`."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return kind(st.st_mode) and st.st_uid == uid


def keepers_in(path: Path) -> list[Keeper]:
    """The live keepers with a control socket in runtime dir `path`, by name."""
    uid = _dir_owner(path)
    if uid is None:
        return []
    found = []
    for sock in sorted(path.glob("*.ctl")):
        name = sock.name[: -len(".ctl")]
        try:
            validate_name(name)
        except RuntimeDirError:
            continue
        if len(os.fsencode(str(sock))) > MAX_IPC_PATH:
            continue
        # As root these files belong to another user: take only their own socket and pid file,
        # never a symlink that would make root read or ask something else in their name.
        if not (_owned(sock, uid, stat.S_ISSOCK) and _owned(path / f"{name}.pid", uid,
                                                            stat.S_ISREG)):
            continue
        pid = _read_pid(path / f"{name}.pid")
        if pid is None or not _pid_alive(pid):
            continue
        found.append(Keeper(name, uid, user_name(uid) or str(uid), f"ipc://{sock}", pid))
    return found


def discover(all_users: bool | None = None) -> list[Keeper]:
    """Every live keeper of this user; as root (or with `all_users`), of every user."""
    if all_users is None:
        all_users = os.geteuid() == 0
    out: list[Keeper] = []
    for d in runtime_dirs(all_users):
        out.extend(keepers_in(d))
    return out


def _ask(keeper: Keeper, client: Client) -> Polled:
    try:
        return Polled(keeper, client.call("status"))
    except (NoSupervisor, CommandFailed) as exc:
        return Polled(keeper, None, str(exc))


class Poller:
    """Asks keepers for `status`, keeping one client per endpoint between polls (one connection
    and one ZAP check per keeper, not per scrape); keepers are asked in parallel, from a
    short-lived thread pool. Not thread-safe itself: serialise calls to `poll`."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._clients: dict[str, Client] = {}

    def poll(self, keepers: list[Keeper]) -> list[Polled]:
        """One `status` per keeper, in order; every wait bounded by `timeout` seconds."""
        wanted = {k.endpoint for k in keepers}
        for ep in [e for e in self._clients if e not in wanted]:
            self._clients.pop(ep).close()  # that keeper is gone
        clients = []
        for keeper in keepers:
            client = self._clients.get(keeper.endpoint)
            if client is None:
                client = self._clients[keeper.endpoint] = Client(keeper.endpoint, self.timeout)
            clients.append(client)
        if len(keepers) <= 1:
            return [_ask(k, c) for k, c in zip(keepers, clients, strict=True)]
        # All at once: a scrape then takes as long as the slowest keeper, not their sum. Each
        # client is used by one thread at a time (the pool hands it over with a barrier).
        with ThreadPoolExecutor(max_workers=min(16, len(keepers))) as pool:
            return list(pool.map(_ask, keepers, clients))

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
