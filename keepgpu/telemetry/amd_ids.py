"""The three spellings of one AMD GPU's identity, and how to turn each into ROCr's.

Pure functions (no amdsmi, no torch), so the worker can decode what torch reports before it
opens telemetry, and device selection can build ROCR_VISIBLE_DEVICES entries.

- ROCr / HIP runtime: ``GPU-<16 hex>``, the KFD ``unique_id`` (a 64-bit number) in lower-case hex
  (rocminfo's "Uuid", accepted in ROCR_VISIBLE_DEVICES and HIP_VISIBLE_DEVICES). AMD SMI gives
  the same string as ``amdsmi_get_gpu_enumeration_info(h)["hip_uuid"]``.
- AMD SMI: ``amdsmi_get_gpu_device_uuid`` builds an RFC 4122-shaped text from that 64-bit id, the
  PCI device id and a function/partition byte (amdsmi ``src/amd_smi/amd_smi_uuid.cc``):
  ``<id byte 7><fcn><device id 4 hex>-0000-1000-<80><id byte 6>-<id bytes 5..0, 12 hex>``.
  The 64-bit id can be read back out of it, so ROCr's form follows without another call.
- torch on ROCm: HIP copies the 16 ASCII characters after ``GPU-`` into ``hipUUID.bytes`` and
  torch prints those 16 bytes as hex, so ``GPU-bb0ac32b1c2c644a`` reaches Python as
  ``62623061-6333-3262-3163-326336343461`` (hex of the text "bb0ac32b1c2c644a").
"""

from __future__ import annotations

import re
import string

_HEX = frozenset(string.hexdigits.lower())
_AMDSMI_UUID = re.compile(
    r"^([0-9a-f]{2})[0-9a-f]{6}-[0-9a-f]{4}-1[0-9a-f]{3}-[89ab][0-9a-f]([0-9a-f]{2})-([0-9a-f]{12})$"
)
_ROCR_UUID = re.compile(r"^gpu-([0-9a-f]{16})$")


def uuid_from_hip(hex_text: str) -> str | None:
    """ROCr's ``GPU-<16 hex>`` from the UUID torch/HIP reports on ROCm, else None.

    `hex_text` is torch's ``str(get_device_properties(i).uuid)`` (32 hex digits, dashes
    optional, any case, a ``GPU-`` prefix tolerated). Returns None when those bytes are not 16
    ASCII hex digits: a real binary UUID (NVIDIA), or a GPU without a unique id (ROCr then
    reports ``GPU-XX``).
    """
    digits = hex_text.strip().lower().removeprefix("gpu-").replace("-", "")
    if len(digits) != 32 or not set(digits) <= _HEX:
        return None
    text = bytes.fromhex(digits).decode("ascii", errors="replace")
    if not set(text) <= _HEX:
        return None
    return "GPU-" + text


def rocr_from_amdsmi(amdsmi_uuid: str) -> str | None:
    """ROCr's ``GPU-<16 hex>`` from an ``amdsmi_get_gpu_device_uuid`` text, else None."""
    match = _AMDSMI_UUID.match(amdsmi_uuid.strip().lower())
    if match is None:
        return None
    top, byte6, low = match.groups()
    unique_id = int(top + byte6 + low, 16)
    if unique_id == 0:  # no unique id on this GPU: ROCr says "GPU-XX", which pins nothing
        return None
    return f"GPU-{unique_id:016x}"


def rocr_form(text: str) -> str | None:
    """Any of the three spellings (or ``0x<hex>`` asic_serial) as ROCr's ``GPU-<16 hex>``."""
    lowered = text.strip().lower()
    match = _ROCR_UUID.match(lowered)
    if match is not None:
        return "GPU-" + match.group(1)
    if lowered.startswith("0x") and 2 < len(lowered) <= 18 and set(lowered[2:]) <= _HEX:
        value = int(lowered, 16)
        return f"GPU-{value:016x}" if value else None
    return rocr_from_amdsmi(lowered) or uuid_from_hip(lowered)
