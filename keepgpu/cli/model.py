"""One parsed view of a `status` reply for the front ends (status, explain, top).

Everything a person reads goes through here: sizes in GiB/MiB, percent, °C, W, durations, the
state in words, uids as user names. Unknown values stay None and print as "-", never 0.
Pure: no sockets, no terminal.
"""

from __future__ import annotations

import pwd
from dataclasses import dataclass, field
from typing import Any

KiB, MiB, GiB = 1024, 1024**2, 1024**3

#: (state, reason) -> the state in a few words. Reasons not listed fall back to "state reason".
STATE_WORDS: dict[tuple[str, str | None], str] = {
    ("holding", None): "holding",
    ("holding", "no-telemetry"): "holding, no telemetry",
    ("holding", "pressure-held"): "holding, memory short",
    ("backoff", "busy"): "backing off: others busy",
    ("backoff", "thermal"): "backing off: too hot",
    ("backoff", "pressure"): "gave memory back",
    ("backoff", "paused"): "paused",
    ("starting", None): "starting",
    ("restarting", None): "restarting",
    ("stopping", None): "stopping",
    ("stopping", "hang"): "stopping: worker hung",
    ("stopped", None): "stopped",
    ("yielded", None): "yielded to a command",
    ("fatal", "restart-limit"): "fatal: too many crashes",
    ("fatal", "config"): "fatal: configuration error",
    ("fatal", "spawn-failed"): "fatal: cannot start worker",
}


def human_bytes(n: int | None) -> str:
    """'1.0 GiB', '512 MiB', '12 KiB', '3 B'; '-' for unknown."""
    if n is None:
        return "-"
    if abs(n) >= GiB:
        return f"{n / GiB:.1f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.0f} MiB"
    if abs(n) >= KiB:
        return f"{n / KiB:.0f} KiB"
    return f"{n} B"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def temp(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}°C"


def watts(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}W"


def duration(seconds: float | None) -> str:
    """'0.4s', '12s', '3m05s', '2h07m', '3d04h'; '-' for unknown."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def exit_words(value: Any) -> str | None:
    """`last_exit` ({"code": 3} / {"signal": "SIGKILL"}) as 'exit 3' / 'SIGKILL'."""
    if not isinstance(value, dict):
        return None
    if "signal" in value:
        return str(value["signal"])
    return f"exit {value.get('code')}"


def user_name(uid: int | None) -> str:
    """The login name of `uid` on this host ('uid 1234' when it has none, '?' when unknown)."""
    if uid is None:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class OtherProcess:
    """A process on the GPU that is not the keeper (from `other_processes`)."""

    pid: int
    uid: int | None
    util_pct: float | None
    used_bytes: int | None

    @property
    def user(self) -> str:
        return user_name(self.uid)


@dataclass(frozen=True)
class Policy:
    """The limits the keep loop judges by (the `policy` object of a status GPU entry)."""

    mode: str | None = None
    target_util: float | None = None
    busy_threshold: float | None = None
    max_temp: float | None = None
    on_pressure: str | None = None
    hold_target_bytes: int | None = None
    hold_want_bytes: int | None = None
    busy_clear_s: float | None = None
    calm_for_s: float | None = None
    thermal_resume_c: float | None = None

    @classmethod
    def parse(cls, raw: Any) -> Policy | None:
        if not isinstance(raw, dict):
            return None
        return cls(
            mode=_str(raw.get("mode")), target_util=_num(raw.get("target_util")),
            busy_threshold=_num(raw.get("busy_threshold")), max_temp=_num(raw.get("max_temp")),
            on_pressure=_str(raw.get("on_pressure")),
            hold_target_bytes=_int(raw.get("hold_target_bytes")),
            hold_want_bytes=_int(raw.get("hold_want_bytes")),
            busy_clear_s=_num(raw.get("busy_clear_s")), calm_for_s=_num(raw.get("calm_for_s")),
            thermal_resume_c=_num(raw.get("thermal_resume_c")),
        )


@dataclass(frozen=True)
class GpuView:
    """One entry of `status.gpus`, typed; field names and units as in docs/protocol.md."""

    gpu: int
    state: str
    reason: str | None = None
    uuid: str | None = None
    name: str | None = None
    device_entry: str | None = None
    pid: int | None = None
    incarnation: int | None = None
    restarts: int | None = None
    restarts_in_window: int | None = None
    restart_in_s: float | None = None
    last_exit: str | None = None
    heartbeat_age_s: float | None = None
    held_bytes: int | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    util_pct: float | None = None
    own_util_pct: float | None = None
    others_util_pct: float | None = None
    temp_c: float | None = None
    power_w: float | None = None
    pstate: str | None = None
    duty_pct: float | None = None
    duty_target_pct: float | None = None
    probing: bool = False
    pause_left_s: float | None = None
    paused_forever: bool = False
    telemetry_error: str | None = None
    error: str | None = None
    policy: Policy | None = None
    others: tuple[OtherProcess, ...] = ()
    yielded_to: tuple[int, ...] = ()

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> GpuView:
        others = tuple(
            OtherProcess(p["pid"], _int(p.get("uid")), _num(p.get("util_pct")),
                         _int(p.get("used_bytes")))
            for p in raw.get("other_processes") or ()
            if isinstance(p, dict) and _int(p.get("pid")) is not None
        )
        return cls(
            gpu=_int(raw.get("gpu")) or 0, state=str(raw.get("state") or "?"),
            reason=_str(raw.get("reason")), uuid=_str(raw.get("uuid")),
            name=_str(raw.get("name")), device_entry=_str(raw.get("device_entry")),
            pid=_int(raw.get("pid")), incarnation=_int(raw.get("incarnation")),
            restarts=_int(raw.get("restarts")),
            restarts_in_window=_int(raw.get("restarts_in_window")),
            restart_in_s=_num(raw.get("restart_in_s")),
            last_exit=exit_words(raw.get("last_exit")),
            heartbeat_age_s=_num(raw.get("heartbeat_age_s")),
            held_bytes=_int(raw.get("held_bytes")),
            mem_used_bytes=_int(raw.get("mem_used_bytes")),
            mem_total_bytes=_int(raw.get("mem_total_bytes")),
            util_pct=_num(raw.get("util_pct")), own_util_pct=_num(raw.get("own_util_pct")),
            others_util_pct=_num(raw.get("others_util_pct")), temp_c=_num(raw.get("temp_c")),
            power_w=_num(raw.get("power_w")), pstate=_str(raw.get("pstate")),
            duty_pct=_num(raw.get("duty_pct")), duty_target_pct=_num(raw.get("duty_target_pct")),
            probing=raw.get("probing") is True, pause_left_s=_num(raw.get("pause_left_s")),
            paused_forever=raw.get("paused_forever") is True,
            telemetry_error=_str(raw.get("telemetry_error")), error=_str(raw.get("error")),
            policy=Policy.parse(raw.get("policy")), others=others,
            yielded_to=tuple(p for p in raw.get("yielded_to") or () if isinstance(p, int)),
        )

    @property
    def label(self) -> str:
        """State and reason, short ('backoff busy'): for the 80-column table."""
        return f"{self.state} {self.reason}" if self.reason else self.state

    @property
    def words(self) -> str:
        """The state in a few words ('backing off: others busy')."""
        known = STATE_WORDS.get((self.state, self.reason))
        if known is not None:
            return known
        if self.state == "unkillable":
            return f"unkillable (/proc state {self.reason or '?'})"
        return self.label

    def matches(self, ref: int | str) -> bool:
        """Whether a `--gpus` item (ordinal, UUID or device entry) names this GPU."""
        if isinstance(ref, int):
            return ref == self.gpu
        return ref in (self.uuid, self.device_entry)


@dataclass(frozen=True)
class KeeperView:
    """A whole `status` result: the supervisor and its GPUs."""

    name: str
    pid: int | None
    state: str
    uptime_s: float | None
    engine: str | None
    endpoint: str | None
    version: str | None
    config: dict[str, Any] = field(default_factory=dict)
    gpus: tuple[GpuView, ...] = ()
    hold_left_s: float | None = None  # --max-hold: seconds until it releases and exits

    def header(self) -> str:
        """'supervisor default  pid 1234  running  up 3m05s  engine fake' (the status header
        line since the first release: scripts may read it), then '  ends in 1h30m' under
        --max-hold."""
        line = (f"supervisor {self.name}  pid {self.pid}  {self.state}  "
                f"up {duration(self.uptime_s)}  engine {self.engine or '?'}")
        if self.hold_left_s is not None:
            line += f"  ends in {duration(self.hold_left_s)}"
        return line


def parse_status(result: dict[str, Any]) -> KeeperView:
    """The `status` result (docs/protocol.md) as a KeeperView; missing fields become None."""
    sup = result.get("supervisor") or {}
    raw_config = sup.get("config")
    config: dict[str, Any] = raw_config if isinstance(raw_config, dict) else {}
    return KeeperView(
        name=str(sup.get("name") or "?"), pid=_int(sup.get("pid")),
        state=str(sup.get("state") or "?"), uptime_s=_num(sup.get("uptime_s")),
        engine=_str(config.get("engine")), endpoint=_str(sup.get("endpoint")),
        version=_str(sup.get("version")), config=config,
        hold_left_s=_num(sup.get("hold_left_s")),
        gpus=tuple(GpuView.parse(g) for g in result.get("gpus") or () if isinstance(g, dict)),
    )


def parse_gpu_refs(value: str | None) -> list[int | str] | None:
    """`--gpus 0,GPU-8f3c...` as protocol GPU references (ordinals as ints); None for all.

    Raises ValueError (one line) for what the supervisor would refuse anyway: an empty entry,
    one over 128 characters, a GPU named twice."""
    if value is None:
        return None
    out: list[int | str] = []
    for token in value.split(","):
        token = token.strip()
        if not token:
            raise ValueError(f"empty entry in {value!r}")
        if len(token) > 128:
            raise ValueError(f"entry longer than 128 characters: {token[:20]}...")
        ref: int | str = int(token) if token.isdigit() else token
        if ref in out:
            raise ValueError(f"{value!r} names GPU {token} twice")
        out.append(ref)
    return out
