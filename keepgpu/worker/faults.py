"""Test faults for the fake engine: parsed in keepgpu.protocol.faults (the supervisor checks
them up front too); re-exported here for the worker.

Two more are read by keepgpu/worker/__main__.py before anything else (`VALUE` or
`ENTRY:VALUE,...`): KEEPGPU_FAKE_STOP_AT_SPAWN=1 (SIGSTOP itself at its first line, for the
PDEATHSIG tests) and KEEPGPU_FAKE_EXIT_AT_SPAWN=N (exit N at its first line: cheap restarts).
"""

from keepgpu.protocol.faults import FaultError, Faults, load

__all__ = ["FaultError", "Faults", "load"]
