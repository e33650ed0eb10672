"""Prometheus metrics of every keeper of this user (as root: of every user on the node), made
with prometheus_client from each keeper's `status` reply: `keepgpu-ctl metrics` prints them,
`keepgpu-exporter` serves them. Names and labels: README, "Prometheus metrics".

Base units (`_bytes`, `_seconds`, `_ratio` 0-1, `_celsius`, `_watts`), counters `_total`.
GPU series carry DCGM exporter's join labels `gpu`, `UUID`, `Hostname`, plus `name` (the
keeper) and `user`. A reading the keeper does not know (null in `status`) gives no sample:
absent, never a made-up 0.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from keepgpu.cli.keepers import Keeper, Polled, Poller, discover

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

# prometheus_client is imported where it is used, not here: keepgpu-ctl imports this module
# for every command, and only `metrics` needs it (~20 ms of imports).

KEEPER_LABELS = ["Hostname", "user", "name"]
GPU_LABELS = ["gpu", "UUID", "Hostname", "name", "user"]

#: (metric name, help, status field, scale to base units) of the per-GPU gauges.
_GPU_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    ("keepgpu_gpu_held_bytes", "Device memory the keeper holds", "held_bytes", 1.0),
    ("keepgpu_gpu_own_utilization_ratio",
     "The keeper's own synthetic load (subtract it from the device's utilization)",
     "own_util_pct", 0.01),
    ("keepgpu_gpu_utilization_ratio", "Device utilization as the vendor library reads it",
     "util_pct", 0.01),
    ("keepgpu_gpu_others_utilization_ratio", "Utilization attributed to other processes",
     "others_util_pct", 0.01),
    ("keepgpu_gpu_duty_ratio", "Duty cycle the keep loop runs at now", "duty_pct", 0.01),
    ("keepgpu_gpu_duty_target_ratio", "Duty cycle the keep loop aims at", "duty_target_pct",
     0.01),
    ("keepgpu_gpu_memory_used_bytes", "Device memory used (every process)", "mem_used_bytes",
     1.0),
    ("keepgpu_gpu_memory_total_bytes", "Device memory in total", "mem_total_bytes", 1.0),
    ("keepgpu_gpu_temperature_celsius", "Device temperature", "temp_c", 1.0),
    ("keepgpu_gpu_power_watts", "Device power draw", "power_w", 1.0),
    ("keepgpu_gpu_heartbeat_age_seconds", "Time since the worker's last heartbeat",
     "heartbeat_age_s", 1.0),
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _keeper_families(polled: list[Polled], host: str) -> list[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    up = GaugeMetricFamily("keepgpu_keeper_up", "1 when the keeper answered status",
                           labels=KEEPER_LABELS)
    info = GaugeMetricFamily("keepgpu_keeper_info", "The keeper's version, engine and pid",
                             labels=[*KEEPER_LABELS, "version", "engine", "pid"])
    uptime = GaugeMetricFamily("keepgpu_keeper_uptime_seconds", "Time since the keeper started",
                               labels=KEEPER_LABELS)
    for p in polled:
        labels = [host, p.keeper.user, p.keeper.name]
        up.add_metric(labels, 0.0 if p.status is None else 1.0)
        if p.status is None:
            continue
        sup = p.status.get("supervisor") or {}
        engine = str((sup.get("config") or {}).get("engine") or "")
        info.add_metric([*labels, str(sup.get("version") or ""), engine,
                         str(sup.get("pid") or p.keeper.pid or "")], 1.0)
        seconds = _number(sup.get("uptime_s"))
        if seconds is not None:
            uptime.add_metric(labels, seconds)
    return [up, info, uptime]


def _gpu_families(polled: list[Polled], host: str) -> list[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    gauges = {field: (GaugeMetricFamily(name, text, labels=GPU_LABELS), scale)
              for name, text, field, scale in _GPU_GAUGES}
    # One series per GPU, for its current state: Prometheus marks the previous state's series
    # stale at the next scrape, and a series per possible state would double the scrape.
    state = GaugeMetricFamily("keepgpu_gpu_state", "1, labelled with the slot's current state",
                              labels=[*GPU_LABELS, "state"])
    gpu_info = GaugeMetricFamily("keepgpu_gpu_info", "Device model, entry and worker pid",
                                 labels=[*GPU_LABELS, "modelName", "device_entry", "pid",
                                         "reason"])
    restarts = CounterMetricFamily("keepgpu_gpu_restarts", "Worker restarts since the keeper "
                                   "started", labels=GPU_LABELS)
    for p in polled:
        for g in (p.status or {}).get("gpus") or []:
            labels = [str(g.get("gpu")), str(g.get("uuid") or ""), host, p.keeper.name,
                      p.keeper.user]
            state.add_metric([*labels, str(g.get("state"))], 1.0)
            gpu_info.add_metric([*labels, str(g.get("name") or ""),
                                 str(g.get("device_entry") or ""), str(g.get("pid") or ""),
                                 str(g.get("reason") or "")], 1.0)
            count = _number(g.get("restarts"))
            if count is not None:
                restarts.add_metric(labels, count)
            for field, (family, scale) in gauges.items():
                value = _number(g.get(field))
                if value is not None:
                    family.add_metric(labels, value * scale)
    return [state, gpu_info, restarts, *(f for f, _ in gauges.values())]


def families(polled: list[Polled], host: str | None = None) -> list[Metric]:
    """Every metric family for these polled keepers; `host` is the `Hostname` label."""
    host = host or socket.gethostname()
    return [*_keeper_families(polled, host), *_gpu_families(polled, host)]


class KeeperCollector:
    """A prometheus_client collector: each `collect()` discovers the keepers and polls them.
    Scrapes are serialised (the poller's clients are not thread-safe)."""

    def __init__(self, timeout: float = 1.0, all_users: bool | None = None,
                 find: Callable[[], list[Keeper]] | None = None) -> None:
        self._find = find or (lambda: discover(all_users))
        self._poller = Poller(timeout)
        self._lock = threading.Lock()
        self._host = socket.gethostname()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            polled = self._poller.poll(self._find())
        yield from families(polled, self._host)

    def close(self) -> None:
        with self._lock:
            self._poller.close()


def registry_for(collector: KeeperCollector) -> CollectorRegistry:
    """A registry holding only `collector` (no process or platform metrics of our own)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(collector: KeeperCollector) -> bytes:
    """The Prometheus text exposition of one scrape (CONTENT_TYPE_LATEST)."""
    from prometheus_client import generate_latest

    return generate_latest(registry_for(collector))


@click.command(name="metrics")
@click.pass_context
def metrics_command(ctx: click.Context) -> int:
    """Prometheus text of every keeper of this user (as root: of every user). Each keeper
    gets --timeout seconds to answer; one that does not shows keepgpu_keeper_up 0."""
    timeout = float(getattr(ctx.obj, "timeout", 5.0))
    collector = KeeperCollector(timeout=timeout)
    try:
        click.echo(exposition(collector).decode(), nl=False)
    finally:
        collector.close()
    return 0
