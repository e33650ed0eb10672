"""`keepgpu-ctl top`: a live view of every keeper of this user, drawn with rich.

Every keeper with a pid file in the runtime dir is polled with `status` once per refresh (a
client like any other: no thread and no extra work in the supervisors). Only this process keeps
history: the utilization sparklines (last SPARK_SPAN_S seconds) and the events (state changes
it saw between two polls). `--name`/`--endpoint` given explicitly: that keeper only.

Keys: `q` quits (read with select() on stdin in cbreak mode, no thread); Ctrl-C quits too.
Not a terminal: plain frames, one per refresh. `--once`: one frame, then exit (3 when no keeper
answers). An unknown `--gpus` entry: one line, exit 1.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click
import psutil

from keepgpu.cli.common import EXIT_FAILED, EXIT_NO_SUPERVISOR, fail
from keepgpu.cli.model import KeeperView, parse_gpu_refs, parse_status
from keepgpu.client import Client, CommandFailed, NoSupervisor
from keepgpu.protocol.runtime import default_runtime_dir, paths_for

if TYPE_CHECKING:
    from keepgpu.cli.ctl import Ctx

#: Seconds of utilization history kept per GPU (the sparklines).
SPARK_SPAN_S = 60.0
EVENTS_SHOWN = 3


@dataclass
class KeeperFeed:
    """What top remembers about one keeper between polls."""

    name: str
    endpoint: str
    client: Client
    view: KeeperView | None = None
    problem: str | None = None  # why the last poll got no status
    words: dict[int, str] = field(default_factory=dict)
    events: deque[str] = field(default_factory=lambda: deque(maxlen=EVENTS_SHOWN))
    history: dict[int, deque[tuple[float, float | None, float | None]]] = field(
        default_factory=dict)

    def poll(self, now: float) -> None:
        try:
            self.view, self.problem = parse_status(self.client.call("status")), None
        except NoSupervisor:
            self.view, self.problem = None, "not answering"
        except CommandFailed as exc:
            self.view, self.problem = None, exc.message
        if self.view is None:
            return
        for g in self.view.gpus:
            old = self.words.get(g.gpu)
            if old is not None and old != g.words:
                self.events.append(f"{time.strftime('%H:%M:%S')} gpu {g.gpu}: {old} → {g.words}")
            self.words[g.gpu] = g.words
            hist = self.history.setdefault(g.gpu, deque())
            hist.append((now, g.own_util_pct, g.others_util_pct))
            while hist and now - hist[0][0] > SPARK_SPAN_S:
                hist.popleft()


class Watcher:
    """Finds keepers in the runtime dir and polls them; owns their clients."""

    def __init__(self, only: str | None, timeout: float) -> None:
        self.only = only  # an explicit endpoint: that keeper only
        self.timeout = timeout
        self.where = default_runtime_dir()
        self.feeds: dict[str, KeeperFeed] = {}

    def _found(self) -> Iterator[tuple[str, str]]:
        if self.only is not None:
            yield self.only, self.only
            return
        for pidfile in sorted(self.where.glob("*.pid")):
            name = pidfile.name[: -len(".pid")]
            try:
                lines = pidfile.read_text().splitlines()
                if not psutil.pid_exists(int(lines[0])):
                    continue  # a pid file left by a keeper killed hard
            except (OSError, ValueError, IndexError):
                continue
            endpoint = lines[1] if len(lines) > 1 and lines[1] else None
            yield name, endpoint or paths_for(name, self.where).control_endpoint

    def poll(self) -> list[KeeperFeed]:
        now = time.monotonic()
        seen = dict(self._found())
        for name in list(self.feeds):
            if name not in seen or self.feeds[name].endpoint != seen[name]:
                self.feeds.pop(name).client.close()
        for name, endpoint in seen.items():
            feed = self.feeds.get(name)
            if feed is None:
                feed = self.feeds[name] = KeeperFeed(name, endpoint, Client(endpoint,
                                                                            self.timeout))
            feed.poll(now)
        return list(self.feeds.values())

    def close(self) -> None:
        for feed in self.feeds.values():
            feed.client.close()


def _check_refs(feeds: list[KeeperFeed], refs: list[int | str] | None) -> None:
    gpus = [g for f in feeds if f.view for g in f.view.gpus]
    for ref in refs or ():
        if not any(g.matches(ref) for g in gpus):
            fail(EXIT_FAILED, f"no GPU {ref} in any running keeper")


@contextlib.contextmanager
def cbreak(fd: int | None) -> Iterator[None]:
    """Keys arrive one by one (Ctrl-C still raises SIGINT); the terminal is restored after."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def wait_key(fd: int | None, seconds: float) -> bool:
    """Wait up to `seconds`; whether `q` was pressed."""
    if fd is None:
        time.sleep(max(0.0, seconds))
        return False
    ready, _, _ = select.select([fd], [], [], max(0.0, seconds))
    return bool(ready) and b"q" in os.read(fd, 64).lower()


@click.command()
@click.option("--gpus", default=None, help="show only these GPUs (ordinals or UUIDs)")
@click.option("--interval", type=click.FloatRange(0.1, 1.0), default=1.0, show_default=True,
              help="seconds between refreshes")
@click.option("--once", is_flag=True, help="print one frame and exit (3: no keeper running)")
@click.pass_obj
def top(obj: Ctx, gpus: str | None, interval: float, once: bool) -> int:
    """Live view of every keeper of this user; q or Ctrl-C quits."""
    try:
        refs = parse_gpu_refs(gpus)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus") from None
    parent = click.get_current_context().parent
    explicit = parent is not None and any(
        parent.get_parameter_source(p) not in (None, click.core.ParameterSource.DEFAULT)
        for p in ("name", "endpoint"))
    # Each poll is bounded well under a refresh, so one stuck keeper cannot freeze the view.
    watcher = Watcher(obj.client.endpoint if explicit else None, min(obj.timeout, interval))
    from keepgpu.cli import top_frame  # rich is imported only by `top`

    try:
        feeds = watcher.poll()
        answering = [f for f in feeds if f.view is not None]
        if answering:
            _check_refs(answering, refs)
        if once or not sys.stdout.isatty():
            top_frame.run_plain(watcher, refs, interval, once, feeds)
            return 0 if answering or not once else EXIT_NO_SUPERVISOR
        top_frame.run_live(watcher, refs, interval)
    except KeyboardInterrupt:
        pass
    finally:
        watcher.close()
    return 0
