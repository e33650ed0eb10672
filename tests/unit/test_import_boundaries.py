"""The supervisor never loads torch or keepgpu.worker (design non-negotiable)."""

import subprocess
import sys

CODE = """
import sys
import keepgpu.cli.supervise, keepgpu.cli.ctl, keepgpu.client
import keepgpu.supervisor.loop, keepgpu.supervisor.commands, keepgpu.supervisor.devices
import keepgpu.telemetry, keepgpu.telemetry.fake, keepgpu.telemetry.open
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "keepgpu.worker")))
print(",".join(bad))
"""


def test_supervisor_side_imports_no_torch_and_no_worker():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
