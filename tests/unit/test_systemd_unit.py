"""contrib/systemd/keepgpu@.service stays consistent with the supervisor's defaults: a stop is
never cut short by systemd, and the watchdog matches the heartbeat."""

from __future__ import annotations

import configparser
from pathlib import Path

from keepgpu.protocol import defaults as d

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "keepgpu@.service"


def _seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_is_notify_with_bounded_stop_and_matched_watchdog() -> None:
    svc = _unit()["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["KillMode"] == "mixed"  # SIGTERM to the supervisor only: it releases the GPUs
    assert _seconds(svc["TimeoutStopSec"]) >= d.JOIN_TIMEOUT_S + d.KILL_TIMEOUT_S
    assert _seconds(svc["TimeoutStartSec"]) > d.START_TIMEOUT_S
    heartbeat = float(svc["Environment"].split("=", 1)[1])
    assert svc["Environment"].startswith("KEEPGPU_HEARTBEAT=")
    assert heartbeat == d.HEARTBEAT_S
    # The supervisor pings at WatchdogSec/2; WatchdogSec = the hang timeout = 5 heartbeats.
    assert _seconds(svc["WatchdogSec"]) == d.HANG_TIMEOUT_S == 5 * heartbeat
    assert "--name %i" in svc["ExecStart"]
    assert svc["RestartPreventExitStatus"] == "78"
