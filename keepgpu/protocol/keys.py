"""CURVE keys for tcp control endpoints: one keypair per user, plus authorized client keys.

Layout (`keys_dir()`: `$KEEPGPU_KEYS_DIR`, else `$XDG_CONFIG_HOME/keepgpu`, else
`~/.config/keepgpu`; mode 0700, created on first use):

- `curve.key_secret` (0600): the user's keypair. A supervisor serves tcp with it; clients of that
  user connect with it. With a shared home (usual on clusters) a login node and a compute node
  then agree on the keys without copying anything.
- `curve.key`: the public half, for copying to other hosts.
- `authorized_keys/*.key`: more client public keys a supervisor admits (besides the user's own).
- `servers/<host>.key`: the public key of a supervisor on `<host>` whose keypair is not ours
  (a host without the shared home); without it a client expects the user's own public key.

Files use the ZeroMQ certificate format (`zmq.auth.load_certificate` reads them). Files that are
not ours or that group/other can write (or, for the secret, read) are refused with one line.
"""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

SECRET_FILE = "curve.key_secret"
PUBLIC_FILE = "curve.key"
AUTHORIZED_DIR = "authorized_keys"
SERVERS_DIR = "servers"
_MAX_KEY_FILES = 1000
_MAX_CERT_BYTES = 64 * 1024  # a certificate is ~200 bytes; never read a huge file whole
_BANNER = "#   keepgpu CURVE {what} certificate (ZeroMQ format){warn}\n\nmetadata\ncurve\n"


class KeyFileError(Exception):
    """A key file or directory is missing, malformed or unsafe (keepgpu-supervise exit 78)."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 characters
    secret: bytes


def keys_dir() -> Path:
    env = os.environ.get("KEEPGPU_KEYS_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg:
        return Path(xdg) / "keepgpu"
    # Slurm prologs run without HOME: ask the password database.
    home = os.environ.get("HOME")
    if not home:
        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:  # an uid without a passwd entry (containers): no home to find
            raise KeyFileError(
                f"HOME is not set and uid {os.getuid()} has no passwd entry: "
                "set KEEPGPU_KEYS_DIR (or HOME) to say where the CURVE keys live"
            ) from None
    return Path(home) / ".config" / "keepgpu"


def _check(path: Path, secret: bool) -> os.stat_result:
    """Refuse symlinks, files of other users (root's are fine) and unsafe modes."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise KeyFileError(f"{path} is a symlink; refusing to use it")
    if st.st_uid not in (os.getuid(), 0):
        raise KeyFileError(f"{path} is owned by uid {st.st_uid}, not {os.getuid()}; refusing it")
    bad = 0o077 if secret else 0o022
    if st.st_mode & bad:
        want = "600/700" if secret else "not group/other-writable"
        raise KeyFileError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):o}; it must be {want} (chmod go-rwx)"
        )
    return st


def _ensure_dir(path: Path) -> Path:
    try:
        if not path.exists() and not path.is_symlink():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
        st = _check(path, secret=False)
    except OSError as exc:
        raise KeyFileError(f"cannot use keys dir {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(f"keys dir {path} is not a directory (check KEEPGPU_KEYS_DIR)")
    return path


def _write(path: Path, text: str, mode: int, replace: bool = True) -> bool:
    """Create `path` with `mode` from the start (no window with wider permissions), complete
    or not at all. With `replace=False` an existing file wins and False is returned: two
    processes creating the keypair at once (job steps on nodes sharing a home) must end up
    with the same keys, not each serve its own."""
    # A random part: a stale temporary file of a killed process with our pid (pids repeat in
    # containers) must not stop us.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # atomic, and fails when the name exists (unlike rename)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise
            os.replace(tmp, path)  # a file system without hard links: last writer wins
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _cert(public: bytes, secret: bytes | None) -> str:
    warn = ": SECRET, never share it" if secret else ""
    text = _BANNER.format(what="secret" if secret else "public", warn=warn)
    text += f'    public-key = "{public.decode()}"\n'
    if secret:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text


def read_cert(path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a ZeroMQ certificate file, both Z85."""
    public = secret = None
    for raw in _read_small(path).splitlines():
        line = raw.strip()
        if line.startswith((b"public-key", b"secret-key")) and b"=" in line:
            value = line.split(b"=", 1)[1].strip(b" \t'\"")
            if line.startswith(b"public-key"):
                public = value
            else:
                secret = value
    for key in (public, secret):
        if key is not None and len(key) != 40:
            raise KeyFileError(f"{path}: a CURVE key must be 40 Z85 characters")
    if public is None:
        raise KeyFileError(f"{path}: no public-key line")
    return public, secret


def _read_small(path: Path) -> bytes:
    """The bytes of regular file `path`, refusing what could block or exhaust the reader: a
    FIFO (open and read would wait for a writer forever), a device, a huge file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path} is not a regular file; refusing to read it")
        if st.st_size > _MAX_CERT_BYTES:
            raise KeyFileError(f"{path} is {st.st_size} bytes: too big for a key file")
        return os.read(fd, _MAX_CERT_BYTES)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def own_keypair(create: bool = True) -> KeyPair:
    """The user's keypair, created (0600 in a 0700 dir) on first use when `create`."""
    base = _ensure_dir(keys_dir()) if create else keys_dir()
    path = base / SECRET_FILE
    if not path.exists() and not path.is_symlink():
        if not create:
            raise KeyFileError(f"no CURVE keypair at {path}")
        public, secret = zmq.curve_keypair()
        try:
            # When another process created it meanwhile, theirs is read below and used.
            if _write(path, _cert(public, secret), 0o600, replace=False):
                _write(base / PUBLIC_FILE, _cert(public, None), 0o644)
        except OSError as exc:
            raise KeyFileError(f"cannot create {path}: {exc.strerror or exc}") from exc
    try:
        _check(path, secret=True)
    except OSError as exc:
        raise KeyFileError(f"cannot use {path}: {exc.strerror or exc}") from exc
    public, maybe_secret = read_cert(path)
    if maybe_secret is None:
        raise KeyFileError(f"{path}: no secret-key line")
    if zmq.curve_public(maybe_secret) != public:
        raise KeyFileError(f"{path}: the public key does not match the secret key")
    return KeyPair(public, maybe_secret)


REREAD_S = 1.0  # authorized_keys/ is read again at least this often, and whenever it changes
_clock = time.monotonic
_cache: dict[tuple[str, bytes], tuple[float, tuple[int, int, int], frozenset[bytes]]] = {}


def authorized_keys(own: KeyPair) -> tuple[set[bytes], list[str]]:
    """Client public keys (raw 32 bytes) a supervisor admits: the user's own plus every
    `authorized_keys/*.key`; and one message per file skipped as unsafe or malformed.

    The supervisor asks at every CURVE handshake, which anyone who can reach the port can
    start: the folder is read again only when it changed (a key added or removed counts at
    once) or REREAD_S after the last read (a file edited in place), else the last answer is
    given, without the messages (they were given with it)."""
    folder = keys_dir() / AUTHORIZED_DIR
    try:
        st = os.lstat(folder)
        sig = (st.st_dev, st.st_ino, st.st_ctime_ns)  # ctime: entries and mode changes
    except OSError:
        sig = (0, 0, 0)
    now = _clock()
    key = (str(folder), own.public)
    hit = _cache.get(key)
    if hit is not None and hit[1] == sig and now - hit[0] < REREAD_S:
        return set(hit[2]), []
    allowed, problems = _read_authorized(folder, own)
    _cache[key] = (now, sig, frozenset(allowed))
    return allowed, problems


def _read_authorized(folder: Path, own: KeyPair) -> tuple[set[bytes], list[str]]:
    allowed = {z85.decode(own.public)}
    problems: list[str] = []
    try:
        _check(folder, secret=False)
        names = sorted(n for n in os.listdir(folder) if n.endswith(".key"))[:_MAX_KEY_FILES]
    except FileNotFoundError:
        return allowed, problems
    except (OSError, KeyFileError) as exc:
        return allowed, [str(exc)]
    for name in names:
        path = folder / name
        try:
            _check(path, secret=False)
            allowed.add(z85.decode(read_cert(path)[0]))
        except (OSError, KeyFileError, ValueError) as exc:
            problems.append(f"skipped {path}: {exc}")
    return allowed, problems


def server_public_key(host: str, own: KeyPair) -> bytes:
    """The Z85 public key a client expects from the supervisor at `host`."""
    path = keys_dir() / SERVERS_DIR / f"{host}.key"
    if not path.exists():
        return own.public
    try:
        _check(path, secret=False)
    except OSError as exc:
        raise KeyFileError(f"cannot use {path}: {exc.strerror or exc}") from exc
    return read_cert(path)[0]
