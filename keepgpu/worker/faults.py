"""Test faults for the fake engine: parsed in keepgpu.protocol.faults (the supervisor checks
them up front too); re-exported here for the worker."""

from keepgpu.protocol.faults import FaultError, Faults, load

__all__ = ["FaultError", "Faults", "load"]
