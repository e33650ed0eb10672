"""Null telemetry: knows nothing, says so (every field None)."""

from __future__ import annotations

from collections.abc import Collection

from keepgpu.telemetry.base import GpuSample


class NullTelemetry:
    backend = "null"

    def __init__(self, uuid: str | None = None, name: str | None = None) -> None:
        self._uuid = uuid
        self._name = name

    def sample(self, own_pids: Collection[int] = ()) -> GpuSample:
        return GpuSample(uuid=self._uuid, name=self._name)

    def close(self) -> None:
        return None
