"""A device's UUID as the torch runtime shows it, in the spelling NVML / AMD SMI know.

Pure (no torch): the torch engine feeds it `get_device_properties(0).uuid`.
"""

from __future__ import annotations

from keepgpu.telemetry.amd_ids import rocr_form, uuid_from_hip


def _hex_digits(text: str) -> str | None:
    """The 32 hex digits of a UUID as torch prints it ("xxxxxxxx-xxxx-..."), else None."""
    digits = text.strip().lower().replace("-", "")
    if len(digits) != 32 or any(c not in "0123456789abcdef" for c in digits):
        return None
    return digits


def own_uuid(kind: str, raw: object, pinned: str) -> str | None:
    """The device's UUID in the spelling its management library (NVML, AMD SMI) knows.

    `raw`: torch's `get_device_properties(0).uuid` (16 bytes printed as hex, no prefix).
    `pinned`: the entry in CUDA_VISIBLE_DEVICES; on a MIG instance ("MIG-...") torch prints the
    MIG UUID's bytes, and NVML wants them as "MIG-...", not "GPU-...".
    """
    if raw is None:
        return None
    text = str(raw).strip()
    if kind == "rocm":
        return text if text.upper().startswith("GPU-") else uuid_from_hip(text)
    if text.startswith(("GPU-", "MIG-")):
        return text
    if _hex_digits(text) is None:
        return None
    return ("MIG-" if pinned.startswith("MIG-") else "GPU-") + text.lower()


def _norm_id(text: str) -> str:
    text = text.strip().lower()
    for prefix in ("gpu-", "mig-", "0x"):
        text = text.removeprefix(prefix)
    return text.replace("-", "")


def same_device(kind: str, own: str, expected: str) -> bool | None:
    """Whether the engine's and the supervisor's UUIDs name one device (None: cannot tell).

    CUDA: NVML and the runtime spell the same 16 bytes. ROCm: the supervisor knows AMD SMI's
    UUID, which carries ROCr's 64-bit unique id (keepgpu.telemetry.amd_ids): both are compared
    in ROCr's "GPU-<16 hex>" form; when either has no such form, it cannot be told.
    """
    if _norm_id(own) == _norm_id(expected):
        return True
    if kind == "rocm":
        a, b = rocr_form(own), rocr_form(expected)
        return None if a is None or b is None else a == b
    return False
