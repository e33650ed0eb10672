"""keepgpu: keep shared GPUs held while their owner is not computing on them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keepgpu._version import __version__

if TYPE_CHECKING:
    from keepgpu.context import HoldError, hold, yielded

__all__ = ["HoldError", "__version__", "hold", "yielded"]


def __getattr__(name: str) -> Any:
    # Lazy: importing keepgpu must not pull in pyzmq or subprocess machinery.
    if name in ("hold", "HoldError", "yielded"):
        from keepgpu import context

        return getattr(context, name)
    raise AttributeError(name)
