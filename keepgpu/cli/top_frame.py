"""Drawing `keepgpu-ctl top` with rich: one frame per poll (see keepgpu.cli.top). Imported
only when `top` runs, so that other keepgpu-ctl commands never load rich."""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from keepgpu.cli.model import GpuView, human_bytes, pct, temp, watts
from keepgpu.cli.top import SPARK_SPAN_S, KeeperFeed, Watcher, cbreak, wait_key

SPARK_CHARS = "▁▂▃▄▅▆▇█"
STATE_STYLE = {"holding": "green", "backoff": "yellow", "fatal": "bold red",
               "unkillable": "bold red", "restarting": "magenta", "starting": "cyan"}


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


def run_live(watcher: Watcher, refs: list[int | str] | None, interval: float) -> None:
    console = Console()
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    with cbreak(fd), Live(console=console, auto_refresh=False, screen=True) as live:
        while True:
            started = time.monotonic()
            feeds = watcher.poll()
            live.update(frame(feeds, refs, console.width, time.monotonic(), watcher.where),
                        refresh=True)
            if wait_key(fd, interval - (time.monotonic() - started)):
                return


def run_plain(watcher: Watcher, refs: list[int | str] | None, interval: float, once: bool,
           feeds: list[KeeperFeed]) -> None:
    console = Console(highlight=False)
    while True:
        console.print(frame(feeds, refs, console.width, time.monotonic(), watcher.where))
        if once:
            return
        time.sleep(interval)
        console.print()
        feeds = watcher.poll()
