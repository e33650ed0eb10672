"""Holding around real commands: `keepgpu-supervise -- CMD`, `keepgpu-ctl yield -- CMD`,
`client.yielded()`, and `--max-hold` (keepgpu issue 12, items 1-3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kgtest import CTL, SUPERVISE, Sup, alive, proc_key, wait_until

from keepgpu.client import Client, CommandFailed

FAST = ["--join-timeout", "1", "--kill-timeout", "1"]


def _run_supervise(env: dict[str, str], *args: str, timeout: float = 60
                   ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SUPERVISE, "--gpus", "0,1", "-q", *FAST, *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---- keepgpu-supervise -- CMD -------------------------------------------------------------


@pytest.mark.parametrize(("cmd", "code"), [
    (["true"], 0),
    (["sh", "-c", "exit 7"], 7),
    (["sh", "-c", "kill -9 $$"], 128 + 9),
    (["sh", "-c", "kill -TERM $$"], 128 + 15),
    (["no-such-command-kg"], 127),
])
def test_supervise_exits_with_the_commands_code(base_env: dict[str, str], cmd: list[str],
                                                code: int) -> None:
    out = _run_supervise(base_env, "--", *cmd)
    assert out.returncode == code, out.stderr


def test_the_command_starts_once_every_gpu_holds_and_the_gpus_are_released_after(
    base_env: dict[str, str], runtime_dir: Path
) -> None:
    # CMD asks the keeper (found through KEEPGPU_NAME, set for it) for its states.
    script = ("import json, subprocess, sys; "
              f"r = subprocess.run({CTL!r} + ['status', '--json'], capture_output=True, "
              "text=True); g = json.loads(r.stdout)['gpus']; "
              "print(json.dumps([(x['state'], x['pid']) for x in g]))")
    out = _run_supervise(base_env, "--name", "cmdname", "--", sys.executable, "-c", script)
    assert out.returncode == 0, out.stderr
    seen = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert [s for s, _ in seen] == ["holding", "holding"]
    # After the keeper exited, none of the workers CMD saw is left.
    assert not any(alive(k) for k in (proc_key(p) for _, p in seen) if k)


def test_no_wait_starts_the_command_before_the_gpus_hold(base_env: dict[str, str]) -> None:
    script = ("import json, subprocess, sys, time; time.sleep(0.3); "
              f"r = subprocess.run({CTL!r} + ['status', '--json'], capture_output=True, "
              "text=True); print(r.returncode, r.stdout and [g['state'] for g in "
              "json.loads(r.stdout)['gpus']])")
    env = {**base_env, "KEEPGPU_FAKE_START_DELAY": "5"}
    out = _run_supervise(env, "--no-wait", "--", sys.executable, "-c", script)
    assert out.returncode == 0, out.stderr
    assert "holding" not in out.stdout  # CMD ran while the workers were still starting


def test_sigterm_to_the_keeper_goes_to_the_command_first(
    base_env: dict[str, str], runtime_dir: Path
) -> None:
    marker = runtime_dir / "got-term"
    script = ("import signal, sys, time, pathlib\n"
              "def h(n, f):\n"
              f"    pathlib.Path({str(marker)!r}).write_text('x'); sys.exit(3)\n"
              "signal.signal(signal.SIGTERM, h)\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([*SUPERVISE, "--gpus", "0", "-q", *FAST, "--", sys.executable, "-c",
                             script], env=base_env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 3  # CMD's code: it got the signal and chose its exit
        assert marker.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def test_command_with_detach_is_a_usage_error(base_env: dict[str, str]) -> None:
    out = _run_supervise(base_env, "--detach", "--", "true")
    assert out.returncode == 2 and "--detach" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ---- keepgpu-ctl yield -- CMD --------------------------------------------------------------


def _script_seeing(sup: Sup) -> list[str]:
    """A CMD that prints the GPU states and held bytes it sees while it runs."""
    return [sys.executable, "-c",
            "import json, subprocess; "
            f"r = subprocess.run({CTL!r} + ['--name', {sup.name!r}, 'status', '--json'], "
            "capture_output=True, text=True); "
            "print(json.dumps([(g['state'], g['held_bytes'], g['pid'], g['yielded_to']) "
            "for g in json.loads(r.stdout)['gpus']]))"]


def test_yield_frees_the_gpus_for_cmd_and_holds_again_after(start_sup: Callable[..., Sup]
                                                            ) -> None:
    import json
    sup = start_sup("--gpus", "0,1", *FAST)
    before = sup.wait_states("holding")
    out = sup.ctl("yield", "--", *_script_seeing(sup))
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # While CMD ran: every worker stopped (no held memory), yielded to CMD's own pid.
    assert [s[0] for s in seen] == ["yielded", "yielded"]
    assert all(s[1] is None and s[2] is None and len(s[3]) == 1 for s in seen)
    assert not any(alive(k) for k in (proc_key(g["pid"]) for g in before) if k)
    after = sup.wait_states("holding", timeout=1 + 0.5 + 10)
    assert all(g["incarnation"] == 2 and g["yielded_to"] == [] for g in after)


def test_yield_passes_on_cmds_exit_code(start_sup: Callable[..., Sup]) -> None:
    sup = start_sup("--gpus", "0", *FAST)
    sup.wait_states("holding")
    assert sup.ctl("yield", "--", "sh", "-c", "exit 9").returncode == 9
    assert sup.ctl("yield", "--", "sh", "-c", "kill -9 $$").returncode == 137
    out = sup.ctl("yield", "--", "no-such-command-kg")
    assert out.returncode == 127 and "not found" in out.stderr
    sup.wait_states("holding")


def test_sigkill_of_cmd_during_a_yield_holds_again_within_the_bound(
    start_sup: Callable[..., Sup]
) -> None:
    sup = start_sup("--gpus", "0,1", *FAST)
    sup.wait_states("holding")
    ctl = subprocess.Popen([*CTL, "--name", sup.name, "yield", "--", "sleep", "60"],
                           env=sup.env, stderr=subprocess.DEVNULL)
    try:
        gpus = sup.wait_states("yielded", timeout=20)
        cmd_pid = gpus[0]["yielded_to"][0]
        # SIGKILL keepgpu-ctl first: the keeper must not trust it, and must wait for CMD.
        ctl.kill()
        ctl.wait(10)
        time.sleep(1.5)
        assert [g["state"] for g in sup.gpus()] == ["yielded", "yielded"]
        os.kill(cmd_pid, signal.SIGKILL)
        killed = time.monotonic()
        sup.wait_states("holding", timeout=20)
        took = time.monotonic() - killed
        # The bound: a pidfd wake-up plus a worker start (fake engine); generous on a busy box.
        assert took < 10, took
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait(10)


def test_overlapping_yields_compose(start_sup: Callable[..., Sup]) -> None:
    sup = start_sup("--gpus", "0,1", *FAST)
    sup.wait_states("holding")
    a = subprocess.Popen(["sleep", "60"])
    b = subprocess.Popen(["sleep", "60"])
    try:
        sup.call("yield", {"pid": a.pid}, timeout=15)
        sup.call("yield", {"gpus": [1], "pid": b.pid}, timeout=15)
        gpus = sup.gpus()
        assert [g["yielded_to"] for g in gpus] == [[a.pid], sorted([a.pid, b.pid])]
        a.kill()
        a.wait(10)
        sup.wait_states({0: "holding"}, timeout=15)
        time.sleep(1.0)
        assert sup.gpus()[1]["state"] == "yielded"  # b still runs
        b.kill()
        b.wait(10)
        sup.wait_states("holding", timeout=15)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_yield_bad_input(start_sup: Callable[..., Sup], base_env: dict[str, str],
                         runtime_dir: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(10)
    sup = start_sup("--gpus", "0", *FAST)
    sup.wait_states("holding")
    with pytest.raises(CommandFailed) as err:
        sup.call("yield", {"pid": gone.pid})
    assert err.value.code == "invalid_argument" and "not running" in err.value.message
    for bad in ({}, {"pid": 0}, {"pid": "1"}, {"pid": True}):
        with pytest.raises(CommandFailed) as err:
            sup.call("yield", bad)
        assert err.value.code == "invalid_argument"
    assert sup.gpus()[0]["state"] == "holding"  # nothing changed
    # No keeper by that name: exit 3, and CMD never runs.
    marker = runtime_dir / "ran"
    out = subprocess.run([*CTL, "--name", "nobody", "yield", "--", "touch", str(marker)],
                         env=base_env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 3 and len(out.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_client_yielded_frees_and_holds_again(start_sup: Callable[..., Sup]) -> None:
    sup = start_sup("--gpus", "0,1", *FAST)
    sup.wait_states("holding")
    with Client(sup.endpoint, timeout=5) as client, client.yielded(gpus=[1]) as result:
        assert [g["gpu"] for g in result["gpus"]] == [1]
        states = {g["gpu"]: g["state"] for g in sup.gpus()}
        assert states == {0: "holding", 1: "yielded"}
    sup.wait_states("holding", timeout=15)


def test_keepgpu_yielded_ends_when_its_process_is_killed(start_sup: Callable[..., Sup]
                                                         ) -> None:
    sup = start_sup("--gpus", "0", *FAST)
    sup.wait_states("holding")
    code = ("import keepgpu, time\n"
            f"with keepgpu.yielded(endpoint={sup.endpoint!r}):\n"
            "    print('yielded', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=sup.env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "yielded"
        assert sup.gpus()[0]["state"] == "yielded"
        proc.kill()
        proc.wait(10)
        sup.wait_states("holding", timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


# ---- --max-hold ---------------------------------------------------------------------------


def test_max_hold_expiry_releases_and_exits(start_sup: Callable[..., Sup]) -> None:
    sup = start_sup("--gpus", "0,1", "--max-hold", "3", *FAST)
    gpus = sup.wait_states("holding")
    left = sup.status()["supervisor"]["hold_left_s"]
    assert 0 < left <= 3
    workers = [proc_key(g["pid"]) for g in gpus]
    assert sup.proc.wait(3 + 1 + 1 + 10) == 0
    assert not any(k and alive(k) for k in workers)
    assert "--max-hold reached" in sup.log()


def test_set_max_hold_changes_the_time_left(start_sup: Callable[..., Sup]) -> None:
    sup = start_sup("--gpus", "0", *FAST)
    sup.wait_states("holding")
    assert sup.status()["supervisor"]["hold_left_s"] is None
    out = sup.ctl("set", "--max-hold", "2h")
    assert out.returncode == 0, out.stderr
    assert 7000 < sup.status()["supervisor"]["hold_left_s"] <= 7200
    assert sup.ctl("set", "--max-hold", "off").returncode == 0
    assert sup.status()["supervisor"]["hold_left_s"] is None
    assert sup.ctl("set", "--max-hold", "1").returncode == 0
    assert sup.proc.wait(1 + 1 + 1 + 10) == 0


@pytest.mark.parametrize("value", ["0", "garbage", "-5", "0m", "40d"])
def test_bad_max_hold_is_usage(base_env: dict[str, str], value: str) -> None:
    out = subprocess.run([*SUPERVISE, "--max-hold", value], env=base_env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "--max-hold" in out.stderr


def test_hold_max_hold(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in base_env.items():
        monkeypatch.setenv(key, value)
    import keepgpu
    with keepgpu.hold("0", "1MiB", engine="fake", max_hold="2", join_timeout=1) as client:
        assert 0 < client.call("status")["supervisor"]["hold_left_s"] <= 2
        wait_until(lambda: not os.path.exists(client.endpoint[len("ipc://"):])
                   or _gone(client), 15)


def _gone(client: Client) -> bool:
    try:
        client.call("ping", timeout=0.5)
    except Exception:  # noqa: BLE001 - any failure to answer means the keeper has exited
        return True
    return False
