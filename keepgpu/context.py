"""`with keepgpu.hold(...)`: hold GPUs for the duration of a block of Python code.

Each call starts its own keeper: a `keepgpu-supervise` child with a name of its own
(`hold-<pid>-<n>-<random>`), so nested and concurrent holds in one process are independent and
never collide with a keeper started by hand. The keeper
- logs to `<runtime dir>/<name>.log`, a file: a keeper must never block on a pipe nobody reads.
  The file is removed after a clean release, and kept (and named in HoldError) otherwise;
- ends with this process (`--exit-with <pid>`), even when this process is SIGKILLed;
- is released when the block ends, normally or by an exception, within its join and kill
  timeouts.
Every wait is bounded.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from keepgpu.client import Client, CommandFailed, NoSupervisor, endpoint_for
from keepgpu.protocol import defaults as d
from keepgpu.protocol.runtime import RuntimeDirError, default_runtime_dir, ensure_dir, paths_for

_counter = itertools.count(1)  # next() on a count is atomic under the GIL: safe across threads
_HELD = ("holding", "backoff")
_FAILED = ("fatal", "unkillable")
_TAIL_BYTES = 64 * 1024
_TEXT_RE = re.compile(r"^\S+ \S+ \S+\[\d+\] [A-Z]+ (.*)$")  # --log-format text: the message
_SLACK_S = 10.0


class HoldError(RuntimeError):
    """The keeper could not be started, or some GPU did not hold.

    The message says what happened in plain words, then one line `GPU N: <reason>` per GPU that
    failed, with the keeper's own words. `reasons` holds the same as {gpu: reason}; `log` is
    the keeper's log file (None when there is none to read).
    """

    def __init__(self, message: str, reasons: dict[int, str] | None = None,
                 log: Path | None = None) -> None:
        self.reasons = dict(reasons or {})
        self.log = log
        lines = [message, *(f"GPU {g}: {r}" for g, r in sorted(self.reasons.items()))]
        if log is not None:
            lines.append(f"(keeper log: {log})")
        super().__init__("\n".join(lines))


def _argv(name: str, gpus: str, vram: str, options: dict[str, Any]) -> list[str]:
    argv = [sys.executable, "-m", "keepgpu.cli.supervise", "--name", name,
            "--gpus", gpus, "--vram", vram]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _unique_name() -> str:
    # pid for the reader, a counter for nested/threaded calls, random against pid reuse.
    return f"hold-{os.getpid()}-{next(_counter)}-{secrets.token_hex(3)}"


@contextmanager
def hold(
    gpus: str | list[int] = "all",
    vram: str = "1GiB",
    *,
    name: str | None = None,
    start_timeout: float = 120.0,
    **options: Any,
) -> Iterator[Client]:
    """Hold `gpus` (like `--gpus`) with `vram` each while the block runs; yields a Client.

    Other keyword arguments are `keepgpu-supervise` options (`engine="fake"`, `mode="pstate"`,
    `target_util=20`, `max_hold="8h"`: the keeper ends by itself after 8 h, `log_file=...`).
    Raises HoldError when the keeper cannot start or some GPU does not hold within
    `start_timeout` seconds.
    """
    if options.get("detach"):
        raise ValueError("hold() runs its keeper as a child; detach is not an option here")
    spec = ",".join(str(g) for g in gpus) if isinstance(gpus, list) else gpus
    keeper = _Keeper(name or _unique_name(), spec, vram, dict(options), own_name=name is None)
    held = False
    try:
        keeper.wait_holding(start_timeout)
        held = True
        yield keeper.client
    finally:
        keeper.release(forget_log=held)


class _Keeper:
    """One keeper process, its client and its log file."""

    def __init__(self, name: str, spec: str, vram: str, options: dict[str, Any],
                 own_name: bool) -> None:
        self.own_name = own_name
        try:
            paths = paths_for(name, ensure_dir(default_runtime_dir()))
            endpoint = paths.control_endpoint
            _ = paths.workers_endpoint  # checks the ipc path length too
        except RuntimeDirError as exc:
            raise HoldError(f"cannot start a keeper: {exc}") from None
        self.paths = paths
        log_file = options.pop("log_file", None)
        self.own_log = log_file is None
        self.log = Path(log_file) if log_file else paths.logfile
        options.setdefault("log_format", "json")  # exact messages for HoldError
        join = float(options.get("join_timeout", d.JOIN_TIMEOUT_S))
        self.bound_s = join + float(options.get("kill_timeout", d.KILL_TIMEOUT_S)) + _SLACK_S
        argv = [*_argv(name, spec, vram, options), "--exit-with", str(os.getpid())]
        # O_NONBLOCK: a FIFO given as log_file would block open() until a reader comes
        # (ENXIO instead); then blocking again, as the keeper expects of its stdout.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(self.log, flags, 0o600)
            os.set_blocking(fd, True)
        except OSError as exc:
            raise HoldError(f"cannot open the keeper log {self.log}: {exc.strerror}") from None
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd)
        finally:
            os.close(fd)
        self.client = Client(endpoint, timeout=5.0)
        self.owner = os.getpid()

    def wait_holding(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        gpus: list[dict[str, Any]] = []
        while True:
            code = self.proc.poll()
            if code is not None:
                raise self._exited(code, gpus)
            try:
                gpus = self.client.call("status", timeout=1.0)["gpus"] or gpus
            except NoSupervisor:
                pass  # not bound yet, or busy: the deadline bounds this
            states = [g["state"] for g in gpus]
            if gpus and all(s in _HELD or s in _FAILED for s in states):
                failed = {g["gpu"]: _reason(g) for g in gpus if g["state"] in _FAILED}
                if not failed:
                    return
                raise HoldError(f"{len(failed)} of {len(gpus)} GPU(s) could not be held",
                                failed, self.log)
            if time.monotonic() >= deadline:
                waiting = {g["gpu"]: _reason(g) for g in gpus if g["state"] not in _HELD}
                raise HoldError(f"not every GPU held within {timeout:g}s", waiting, self.log)
            time.sleep(0.1)

    def _exited(self, code: int, gpus: list[dict[str, Any]]) -> HoldError:
        """The keeper ended before every GPU held: its last line and its per-GPU reasons."""
        lines = _tail(self.log)
        messages = [m for m in (_message(line) for line in lines) if m]
        reasons = {g["gpu"]: _reason(g) for g in gpus if g["state"] in _FAILED}
        for gpu, error in _fatal_records(lines):
            reasons[gpu] = error
        last = messages[-1] if messages else "(no output)"
        return HoldError(f"keeper exited {code}: {last}", reasons, self.log)

    def release(self, forget_log: bool) -> None:
        """Stop the keeper (bounded by its join and kill timeouts plus slack) and close."""
        if os.getpid() != self.owner:
            # A fork()ed child leaving the block: the keeper is its parent's (it is not even
            # our child: poll() would say "exited 0" and we would delete its sockets).
            return
        proc = self.proc
        try:
            if proc.poll() is None:
                try:
                    self.client.call("stop", timeout=self.bound_s)
                except (NoSupervisor, CommandFailed):
                    proc.terminate()
            try:
                proc.wait(self.bound_s)
            except subprocess.TimeoutExpired:
                proc.kill()  # its workers follow (PR_SET_PDEATHSIG)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass  # never hang the caller; the process is SIGKILLed already
        finally:
            self.client.close()
        if proc.returncode is None or not self.own_name:
            return
        # Nobody else can use a name made for this call: leave no files behind.
        leftovers = [self.paths.lock, self.paths.control, self.paths.workers, self.paths.pidfile]
        if forget_log and self.own_log and proc.returncode == 0:
            leftovers.append(self.log)
        for path in leftovers:
            path.unlink(missing_ok=True)


def _reason(gpu: dict[str, Any]) -> str:
    state = str(gpu.get("state"))
    why = gpu.get("error") or gpu.get("reason")
    return str(why) if state in _FAILED and why else f"{state}" + (f" ({why})" if why else "")


def _tail(path: Path) -> list[str]:
    """The last lines of the keeper's log (at most _TAIL_BYTES of it)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - _TAIL_BYTES))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return lines[1:] if size > _TAIL_BYTES else lines


def _fatal_records(lines: list[str]) -> list[tuple[int, str]]:
    """(gpu, error) of every json `state` record that made a GPU fatal (the keeper's log is
    json: see Keeper)."""
    out = []
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == "state" and rec.get("state") == "fatal" \
                and isinstance(rec.get("gpu"), int) and isinstance(rec.get("error"), str):
            out.append((rec["gpu"], rec["error"]))
    return out


def _message(line: str) -> str:
    """The message of one log line: a JSON record's `msg`, a text record's message, or the
    line itself (the CLI's one-line errors)."""
    line = line.strip()
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return line
        if isinstance(record, dict) and isinstance(record.get("msg"), str):
            return str(record["msg"])
    match = _TEXT_RE.match(line)
    return str(match.group(1)) if match else line


@contextmanager
def yielded(
    gpus: str | list[int | str] | None = None,
    *,
    name: str = "default",
    endpoint: str | None = None,
    timeout: float = 5.0,
) -> Iterator[dict[str, Any]]:
    """Free the GPUs of a running keeper (`keepgpu-supervise --name NAME`, or `endpoint`) for
    the block, as `keepgpu-ctl yield` does for a command; they are held again when the block
    ends or this process dies. `gpus`: "0,1", a list of ordinals/UUIDs, or None for all.
    Raises keepgpu.client.NoSupervisor (no keeper answering) or CommandFailed."""
    refs: list[int | str] | None = None
    if isinstance(gpus, str):
        refs = [int(t) if t.strip().isdigit() else t.strip() for t in gpus.split(",")]
    elif gpus is not None:
        refs = list(gpus)
    with Client(endpoint or endpoint_for(name), timeout) as client, \
            client.yielded(refs) as result:
        yield result
