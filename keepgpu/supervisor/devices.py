"""Device selection without torch: which device entries the supervisor sees and which `--gpus`
selects. Errors are ConfigError (exit 78) with one clear line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from keepgpu.telemetry.base import DeviceInfo, TelemetryUnavailable


class ConfigError(Exception):
    """Bad configuration: the supervisor exits 78 with this message."""


@dataclass(frozen=True)
class Device:
    """A selected device: `gpu` is its ordinal in the supervisor's visible list, `entry` what is
    written into the worker's *_VISIBLE_DEVICES, `uuid` when known before the worker starts."""

    gpu: int
    entry: str
    uuid: str | None


@dataclass(frozen=True)
class Visible:
    vendor: str  # nvidia | amd | cpu | none
    engine: str  # the concrete engine (auto resolved)
    entries: list[str]
    uuids: list[str | None]


Lister = Callable[[str], list[DeviceInfo]]


def _env_list(env: Mapping[str, str], key: str) -> list[str] | None:
    """Entries of a *_VISIBLE_DEVICES variable, None when unset. Like CUDA, stop at '-1'."""
    raw = env.get(key)
    if raw is None:
        return None
    out: list[str] = []
    for item in raw.split(","):
        item = item.strip()
        if not item or item == "-1":
            break
        out.append(item)
    return out


def _default_lister(vendor: str) -> list[DeviceInfo]:
    from keepgpu.telemetry.open import list_devices

    return list_devices(vendor)


def _vendor_visible(
    vendor: str, engine: str, env: Mapping[str, str], lister: Lister, env_key: str
) -> Visible:
    listed: list[DeviceInfo] | None
    try:
        listed = lister(vendor)
    except TelemetryUnavailable:
        listed = None
    from_env = _env_list(env, env_key)
    if from_env is not None:
        # Index entries are the runtime's ordinals; they match the vendor library's order only
        # under PCI bus ordering, else the worker reports its UUID once it is up.
        trust = vendor == "amd" or env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
        # With MIG on any GPU, CUDA numbers the MIG instances among the devices: its ordinals
        # then follow no NVML index (MIG-<uuid> entries still name their instance).
        trust = trust and not any(d.parent_uuid for d in listed or [])
        by_index = {str(d.index): d.uuid for d in listed or []} if trust else {}
        uuids = [e if e.startswith(("GPU-", "MIG-")) else by_index.get(e) for e in from_env]
        return Visible(vendor, engine, from_env, uuids)
    if listed is None:
        raise ConfigError(
            f"cannot list {vendor} GPUs: the vendor library is unavailable and {env_key} is unset"
        )
    if vendor == "nvidia":
        # Pin by UUID: exact whatever CUDA's ordering; ordinals follow nvidia-smi. MIG
        # instances come listed as devices of their own (MIG-... UUIDs), never their parent.
        return Visible(vendor, engine, [d.uuid for d in listed], [d.uuid for d in listed])
    return Visible(vendor, engine, [str(d.index) for d in listed], [d.uuid for d in listed])


# One AMD GPU as device selection sees it: (worker entry, amdsmi UUID, ROCr "GPU-<16 hex>").
_AmdRow = tuple[str, str | None, str | None]


def _amd_visible(env: Mapping[str, str], lister: Lister) -> Visible:
    """AMD GPUs the user's job allows: ROCr's list, narrowed by ROCR_VISIBLE_DEVICES, then by
    HIP_VISIBLE_DEVICES (or, when that is unset, CUDA_VISIBLE_DEVICES, which HIP also reads):
    HIP's indices count the list left after ROCr's. Slurm sets either, depending on its config.

    Entries are what a worker's ROCR_VISIBLE_DEVICES takes with the HIP lists removed: ROCr's
    "GPU-<16 hex>" where it names one device, else the device's ROCr ordinal.
    """
    try:
        listed: list[DeviceInfo] | None = lister("amd")
    except TelemetryUnavailable:
        listed = None
    rows: list[_AmdRow] | None = None  # None: no listing, so the full list is unknown
    if listed is not None:
        ids = [d.runtime_id for d in listed]
        rows = [(d.runtime_id if d.runtime_id and ids.count(d.runtime_id) == 1 else str(d.index),
                 d.uuid, d.runtime_id) for d in listed]
    hip_key = next((k for k in ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES") if k in env), None)
    for key in ("ROCR_VISIBLE_DEVICES", hip_key):
        wanted = _env_list(env, key) if key else None
        if wanted is not None:
            rows = _narrow(rows, wanted)
    if rows is None:
        raise ConfigError(
            "cannot list amd GPUs: the vendor library is unavailable and ROCR_VISIBLE_DEVICES "
            "is unset"
        )
    return Visible("amd", "rocm", [r[0] for r in rows], [r[1] for r in rows])


def _narrow(rows: list[_AmdRow] | None, wanted: list[str]) -> list[_AmdRow]:
    """The rows a *_VISIBLE_DEVICES list selects: ordinals into `rows`, or UUIDs. Like the
    runtimes, stop at the first entry that names nothing (or, for a UUID that partitions
    share, more than one). `rows` None (no listing): take the entries as they are."""
    if rows is None:
        return [(e, e if e.lower().startswith("gpu-") else None, None) for e in wanted]
    out: list[_AmdRow] = []
    for item in wanted:
        if item.isdigit():
            if int(item) >= len(rows):
                break
            out.append(rows[int(item)])
            continue
        match = [r for r in rows if item.lower() in {(x or "").lower() for x in r}]
        if len(match) != 1:
            break
        out.append(match[0])
    return out


def _fake_visible(env: Mapping[str, str]) -> Visible:
    from keepgpu.telemetry.fake import fake_device_uuid

    entries = _env_list(env, "CUDA_VISIBLE_DEVICES")
    if entries is None:
        raw = env.get("KEEPGPU_FAKE_GPUS", "4")
        try:
            count = int(raw)
        except ValueError:
            raise ConfigError(f"KEEPGPU_FAKE_GPUS must be an integer: {raw!r}") from None
        if not 0 <= count <= 1024:
            raise ConfigError(f"KEEPGPU_FAKE_GPUS must be in 0..1024: {count}")
        entries = [str(i) for i in range(count)]
    return Visible("nvidia", "fake", entries, [fake_device_uuid(e) for e in entries])


def visible_devices(
    engine: str, env: Mapping[str, str] | None = None, lister: Lister | None = None
) -> Visible:
    """The devices this supervisor may hand to workers, for `--engine` (auto resolved here)."""
    env = os.environ if env is None else env
    lister = lister or _default_lister
    if engine == "fake":
        return _fake_visible(env)
    if engine == "cpu":
        return Visible("cpu", "cpu", ["cpu"], [None])
    if engine == "mps":
        return Visible("none", "mps", ["mps"], [None])
    if engine == "cuda":
        return _vendor_visible("nvidia", "cuda", env, lister, "CUDA_VISIBLE_DEVICES")
    if engine == "rocm":
        return _amd_visible(env, lister)
    if engine != "auto":
        raise ConfigError(f"unknown engine {engine!r}")
    reasons = []
    for vendor, concrete in (("nvidia", "cuda"), ("amd", "rocm")):
        try:
            if lister(vendor):
                if vendor == "amd":
                    return _amd_visible(env, lister)
                return _vendor_visible(vendor, concrete, env, lister, "CUDA_VISIBLE_DEVICES")
            reasons.append(f"{vendor}: no devices")
        except TelemetryUnavailable as exc:
            reasons.append(f"{vendor}: {exc}")
    if sys.platform == "darwin":
        return Visible("none", "mps", ["mps"], [None])
    raise ConfigError(
        "no GPU found (" + "; ".join(reasons) + "); use --engine cpu to hold CPU memory "
        "instead, or --engine fake to try keepgpu without a GPU"
    )


def select(spec: str, visible: Visible) -> list[Device]:
    """Resolve `--gpus` ('all', ordinals, UUIDs; comma separated) against the visible list."""
    if not visible.entries:
        raise ConfigError("no GPU is visible to this process")
    text = spec.strip()
    if text == "all":
        return [Device(i, e, visible.uuids[i]) for i, e in enumerate(visible.entries)]
    if not text:
        raise ConfigError("--gpus is empty; give 'all', ordinals like 0,1 or GPU UUIDs")
    chosen: list[int] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            raise ConfigError(f"--gpus {spec!r} has an empty entry")
        index = _resolve(token, visible)
        if index in chosen:
            raise ConfigError(f"--gpus {spec!r} names GPU {index} twice")
        chosen.append(index)
    return [Device(i, visible.entries[i], visible.uuids[i]) for i in chosen]


def _resolve(token: str, visible: Visible) -> int:
    if token.isdigit():
        index = int(token)
        if index >= len(visible.entries):
            raise ConfigError(
                f"no GPU {index}: {len(visible.entries)} visible (ordinals 0-"
                f"{len(visible.entries) - 1})"
            )
        return index
    for i, (entry, uuid) in enumerate(zip(visible.entries, visible.uuids, strict=True)):
        if token in (entry, uuid):
            return i
    raise ConfigError(f"unknown GPU id {token!r}: not an ordinal or a visible GPU's UUID")
