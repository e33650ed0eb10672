"""A device's UUID as the torch runtime shows it, in the spelling NVML / AMD SMI know.

Pure (no torch): the torch engine feeds it `get_device_properties(0).uuid`.
"""

from __future__ import annotations


def _hex_digits(text: str) -> str | None:
    """The 32 hex digits of a UUID as torch prints it ("xxxxxxxx-xxxx-..."), else None."""
    digits = text.strip().lower().replace("-", "")
    if len(digits) != 32 or any(c not in "0123456789abcdef" for c in digits):
        return None
    return digits


def _rocm_uuid(text: str) -> str | None:
    """ROCr's "GPU-<16 hex>" from torch's ROCm UUID, else None.

    HIP copies the 16 characters after ROCr's "GPU-" into hipUUID.bytes and torch prints those
    bytes as hex, so "GPU-bb0ac32b1c2c644a" arrives as "62623061-6333-3262-3163-326336343461"
    (the hex of the text "bb0ac32b1c2c644a"). Private copy of the decoder; keepgpu.telemetry.amd
    grows the shared one.
    """
    digits = _hex_digits(text)
    if digits is None:
        return None
    chars = bytes.fromhex(digits)
    if not all(c in b"0123456789abcdefABCDEF" for c in chars):
        return None  # not ROCr's text (e.g. an all-zero UUID of an old runtime)
    return "GPU-" + chars.decode("ascii").lower()


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
        return text if text.upper().startswith("GPU-") else _rocm_uuid(text)
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

    CUDA: NVML and the runtime spell the same 16 bytes. ROCm: AMD SMI's UUID is its own and is
    not ROCr's unique id; the ROCr id may appear at its end, which is taken as a match (not
    verified on hardware), anything else cannot be told.
    """
    a, b = _norm_id(own), _norm_id(expected)
    if a == b:
        return True
    if kind == "rocm":
        return True if (a.endswith(b) or b.endswith(a)) and min(len(a), len(b)) >= 16 else None
    return False
