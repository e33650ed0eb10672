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
import math
import os
import select
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
import psutil
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from keepgpu.cli.common import EXIT_FAILED, EXIT_NO_SUPERVISOR, fail
from keepgpu.cli.model import (
    GpuView,
    KeeperView,
    human_bytes,
    parse_gpu_refs,
    parse_status,
    pct,
    temp,
    watts,
)
from keepgpu.client import Client, CommandFailed, NoSupervisor
from keepgpu.protocol.runtime import default_runtime_dir, paths_for

if TYPE_CHECKING:
    from keepgpu.cli.ctl import Ctx

SPARK_SPAN_S = 60.0
SPARK_CHARS = "▁▂▃▄▅▆▇█"
EVENTS_SHOWN = 3
STATE_STYLE = {"holding": "green", "backoff": "yellow", "fatal": "bold red",
               "unkillable": "bold red", "restarting": "magenta", "starting": "cyan"}


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


def sparkline(samples: deque[tuple[float, float | None, float | None]], which: int,
              width: int, now: float) -> str:
    """The last SPARK_SPAN_S seconds in `width` characters (oldest left); the mean of each
    slice; ' ' where there is no reading. `which`: 1 = own, 2 = others."""
    step = SPARK_SPAN_S / width
    out = []
    for i in range(width):
        lo = now - SPARK_SPAN_S + i * step
        vals = [s[which] for s in samples if lo < s[0] <= lo + step and s[which] is not None]
        if not vals:
            out.append(" ")
            continue
        mean = sum(v for v in vals if v is not None) / len(vals)
        out.append(SPARK_CHARS[min(len(SPARK_CHARS) - 1, int(mean / 100 * len(SPARK_CHARS)))])
    return "".join(out)


def _bar(held: int | None, total: int | None, width: int) -> Text:
    if held is None or not total:
        return Text("·" * width, style="dim")
    full = min(width, math.ceil(held / total * width))
    return Text("█" * full, style="magenta") + Text("░" * (width - full), style="dim")


def _gpu_lines(feed: KeeperFeed, g: GpuView, width: int, now: float) -> list[Text]:
    words = g.words
    line1 = Text(f"{g.gpu:>3} ")
    line1.append(f"{words:<28.28}", style=STATE_STYLE.get(g.state, ""))
    line1.append(" ")
    line1.append_text(_bar(g.held_bytes, g.mem_total_bytes, 12))
    line1.append(f" {human_bytes(g.held_bytes)} of {human_bytes(g.mem_total_bytes)}")
    line1.append(f"  restarts {g.restarts if g.restarts is not None else '-'}")
    spark_w = max(8, (width - 46) // 2)
    hist = feed.history.get(g.gpu, deque())
    line2 = Text("    own ")
    line2.append(sparkline(hist, 1, spark_w, now), style="green")
    line2.append(f" {pct(g.own_util_pct):>4}  others ")
    line2.append(sparkline(hist, 2, spark_w, now), style="yellow")
    line2.append(f" {pct(g.others_util_pct):>4}  {temp(g.temp_c):>5} {watts(g.power_w):>5} "
                 f"{g.pstate or '-':>3}")
    for line in (line1, line2):
        line.no_wrap, line.overflow = True, "ellipsis"
    return [line1, line2]


def frame(feeds: list[KeeperFeed], refs: list[int | str] | None, width: int, now: float,
          where: Path) -> Group:
    """One screen: a title line, then per keeper its header, two lines per GPU, its events."""
    title = Text(f"keepgpu top  {time.strftime('%H:%M:%S')}  {len(feeds)} keeper(s)  "
                 "q quits", style="bold")
    lines: list[Text] = [title]
    if not feeds:
        lines.append(Text(f"no keeper running (nothing in {where}); start one with "
                          "keepgpu-supervise", style="yellow"))
    for feed in feeds:
        if feed.view is None:
            lines.append(Text(f"keeper {feed.name}: {feed.problem}", style="red"))
            continue
        lines.append(Text(feed.view.header(), style="bold cyan"))
        for g in feed.view.gpus:
            if refs is None or any(g.matches(r) for r in refs):
                lines += _gpu_lines(feed, g, width, now)
        if feed.events:
            lines += [Text(f"  {e}", style="dim", no_wrap=True, overflow="ellipsis")
                      for e in feed.events]
        else:
            lines.append(Text("  no state change seen yet", style="dim"))
    return Group(*lines)


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
def _cbreak(fd: int | None) -> Iterator[None]:
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


def _wait_key(fd: int | None, seconds: float) -> bool:
    """Wait up to `seconds`; whether `q` was pressed."""
    if fd is None:
        time.sleep(max(0.0, seconds))
        return False
    ready, _, _ = select.select([fd], [], [], max(0.0, seconds))
    return bool(ready) and b"q" in os.read(fd, 64).lower()


def _live(watcher: Watcher, refs: list[int | str] | None, interval: float) -> None:
    console = Console()
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    with _cbreak(fd), Live(console=console, auto_refresh=False, screen=True) as live:
        while True:
            started = time.monotonic()
            feeds = watcher.poll()
            live.update(frame(feeds, refs, console.width, time.monotonic(), watcher.where),
                        refresh=True)
            if _wait_key(fd, interval - (time.monotonic() - started)):
                return


def _plain(watcher: Watcher, refs: list[int | str] | None, interval: float, once: bool,
           feeds: list[KeeperFeed]) -> None:
    console = Console(highlight=False)
    while True:
        console.print(frame(feeds, refs, console.width, time.monotonic(), watcher.where))
        if once:
            return
        time.sleep(interval)
        console.print()
        feeds = watcher.poll()


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
    try:
        feeds = watcher.poll()
        answering = [f for f in feeds if f.view is not None]
        if answering:
            _check_refs(answering, refs)
        if once or not sys.stdout.isatty():
            _plain(watcher, refs, interval, once, feeds)
            return 0 if answering or not once else EXIT_NO_SUPERVISOR
        _live(watcher, refs, interval)
    except KeyboardInterrupt:
        pass
    finally:
        watcher.close()
    return 0
