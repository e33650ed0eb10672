"""The amdsmi wrapper / libamd_smi.so version check (keepgpu issue 10, item 10).

The PyPI `amdsmi` package is a pure ctypes wrapper generated for one ROCm release; pip happily
puts a 7.x wrapper over a ROCm 6 library, whose structs differ (amdsmi_version_t itself gained
and lost fields between 6.4 and 7.0), so every read is garbage or a crash. amdsmi has no check
of its own. Never imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from keepgpu.telemetry.base import TelemetryUnavailable

log = logging.getLogger(__name__)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _major(text: object) -> int | None:
    """Major number of a version text like "7.0.2" (None when there is none)."""
    head = str(text).strip().split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _wrapper_version(binding: Any) -> str | None:
    """The amdsmi Python package's version (amdsmi/_version.py, same as ROCm's: "7.0.2")."""
    version = getattr(binding, "__version__", None)
    if isinstance(version, str) and version:
        return version
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("amdsmi")
    except (ImportError, PackageNotFoundError, ValueError):
        return None


def check_versions(binding: Any) -> None:
    """Refuse an amdsmi wrapper whose major version differs from the installed ROCm's.

    ROCm comes from rocm-core (`amdsmi_get_rocm_version`, no init needed). Without it, a 7.x
    wrapper still checks `amdsmi_get_lib_version`: libamd_smi.so numbers itself 26.x from
    ROCm 7.0 on (24.x-25.x in ROCm 6), and a ROCm 6 library read through the 7.x struct shows
    its 24/25 in that field. Raises TelemetryUnavailable with what to install.
    """
    wrapper = _wrapper_version(binding)
    want = _major(wrapper)
    if want is None:
        log.debug("amdsmi package version unknown: version check skipped")
        return
    rocm = _rocm_version(binding)
    if rocm is not None and _major(rocm) not in (None, want):
        raise TelemetryUnavailable(
            f"amdsmi {wrapper} does not match ROCm {rocm}: its ctypes structs would misread "
            f"libamd_smi.so; install the matching wrapper (pip install 'amdsmi=={rocm}', or "
            f"pip install /opt/rocm/share/amd_smi)"
        )
    if rocm is None and want >= 7:
        lib = _lib_major(binding)
        if lib is not None and lib < 26:
            raise TelemetryUnavailable(
                f"amdsmi {wrapper} is for ROCm 7 but libamd_smi.so is library {lib}.x "
                f"(ROCm 6): install the wrapper of your ROCm (pip install 'amdsmi<7', or "
                f"pip install /opt/rocm/share/amd_smi)"
            )


def _rocm_version(binding: Any) -> str | None:
    """ROCm's version from rocm-core ("6.4.3"), None when amdsmi cannot tell."""
    fn = getattr(binding, "amdsmi_get_rocm_version", None)
    if fn is None:
        return None
    try:
        ok, text = fn()  # (True, "6.4.3") or (False, "Could not find librocm-core.so")
    except (binding.AmdSmiException, OSError, ValueError, TypeError) as exc:
        log.debug("amdsmi_get_rocm_version failed: %s", _one_line(exc))
        return None
    return str(text) if ok and _major(text) is not None else None


def _lib_major(binding: Any) -> int | None:
    fn = getattr(binding, "amdsmi_get_lib_version", None)
    if fn is None:
        return None
    try:
        info = fn()
    except binding.AmdSmiException as exc:
        log.debug("amdsmi_get_lib_version failed: %s", _one_line(exc))
        return None
    major = info.get("major") if isinstance(info, Mapping) else None
    return major if isinstance(major, int) else None
