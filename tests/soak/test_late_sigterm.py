"""Found by the fault soak: a SIGTERM that reaches the supervisor after its release is complete,
while Python is finalizing, kills it (exit -15 instead of the release's 0/1). CPython's
finalization puts SIG_DFL back for every handler Python installed, so the supervisor's no-op
handler is gone in that window; workers are already released, only the exit status is lost.
A `keepgpu-ctl stop` followed by a Slurm epilog's or systemd's SIGTERM hit that window; the
supervisor now ignores TERM/INT/HUP once its release is over."""

from __future__ import annotations

import signal
import time

from kgtest import Sup

FAST = ["--heartbeat", "0.2", "--hang-timeout", "1", "--join-timeout", "1", "--kill-timeout", "1"]


def test_sigterm_after_the_release_keeps_the_exit_code(start_sup):
    for _ in range(3):
        sup: Sup = start_sup("--gpus", "0,1", *FAST)
        sup.wait_states("holding")
        result = sup.call("stop", timeout=10)
        assert [g["outcome"] for g in result["gpus"]] == ["released", "released"]
        # The release is complete and the process is on its way out: SIGTERM it until it is
        # gone, as an epilog that does not know a stop already ran would.
        deadline = time.monotonic() + 10
        while sup.proc.poll() is None and time.monotonic() < deadline:
            sup.proc.send_signal(signal.SIGTERM)
            time.sleep(0.002)
        assert sup.proc.wait(5) == 0, "released cleanly, so exit 0"
