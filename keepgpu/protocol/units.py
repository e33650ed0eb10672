"""Parsing of the sizes, percents and durations accepted on the CLI and over the control socket."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
#: Largest size accepted (8 EiB): beyond any device, and still a C int64 for the engines.
MAX_BYTES = 2**63 - 1
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_PCT_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")


class UnitError(ValueError):
    """A size, percent or duration that cannot be understood."""


@dataclass(frozen=True)
class VramRequest:
    """How much VRAM a worker should hold: an absolute byte count or a percent of total memory.

    CLI `--vram`, protocol arg `vram` (a string like "1GiB", "20%" or an integer byte count).
    """

    bytes: int | None = None
    percent: float | None = None

    def resolve(self, total_bytes: int | None) -> int:
        """Bytes to hold on a device with `total_bytes` of memory (needed for a percent)."""
        if self.bytes is not None:
            return self.bytes
        assert self.percent is not None
        if total_bytes is None:
            raise UnitError(f"--vram {self.percent:g}% needs the device's total memory (unknown)")
        return int(total_bytes * self.percent / 100.0)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.bytes)

    def to_wire(self) -> str | int:
        return f"{self.percent:g}%" if self.percent is not None else int(self.bytes or 0)


def parse_size(text: str) -> int:
    """Parse "1GiB", "750MB", "4096" (bytes) into a positive byte count."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UnitError(f"not a size: {text!r} (use e.g. 1GiB, 750MB, 4096)")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise UnitError(
            f"unknown size unit {m.group(2)!r} in {text!r} (use B, KB, MB, GB, KiB, MiB, GiB)"
        )
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value > MAX_BYTES:
        raise UnitError(f"size is too large (at most 8 EiB): {_clip(text)}")
    if value < 1:
        raise UnitError(f"size must be at least 1 byte: {text!r}")
    return int(value)


def _clip(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def parse_vram(value: str | int) -> VramRequest:
    """Parse a `--vram` value: a size or a percent in (0, 100]."""
    if isinstance(value, bool):
        raise UnitError("vram must be a size string, a percent string or an integer byte count")
    if isinstance(value, int):
        if value < 1:
            raise UnitError(f"vram must be positive: {_clip(str(value))}")
        if value > MAX_BYTES:
            raise UnitError(f"vram is too large (at most 8 EiB): {_clip(str(value))}")
        return VramRequest(bytes=value)
    m = _PCT_RE.match(value)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise UnitError(f"vram percent must be in (0, 100]: {_clip(value)}")
        return VramRequest(percent=pct)
    return VramRequest(bytes=parse_size(value))


def format_bytes(n: int | None) -> str:
    """Human-readable binary size; '-' for unknown."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"  # pragma: no cover


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, max_s: float) -> float:
    """`90m`, `8h`, `1h30m`, `2d`, `45s` or plain seconds (`3600`, `1.5`) -> seconds (float).

    CLI `--max-hold`. Raises UnitError for garbage, zero, or more than `max_s` seconds."""
    raw = text.strip().lower()
    total, pos = 0.0, 0
    while pos < len(raw):
        match = _DURATION_PART.match(raw, pos)
        if match is None or match.group(2) not in _DURATION_UNITS:
            raise UnitError(f"not a duration: {_clip(text)} (e.g. 90m, 8h, 1h30m, 3600)")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
        while pos < len(raw) and raw[pos] == " ":
            pos += 1
    if not raw:
        raise UnitError("empty duration (e.g. 90m, 8h, 3600)")
    if not total > 0:
        raise UnitError(f"duration must be more than 0: {_clip(text)}")
    if total > max_s:
        raise UnitError(f"duration {_clip(text)} is longer than {max_s / 86400:g} days")
    return total
