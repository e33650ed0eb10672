"""The supervisor with real processes and real ZeroMQ (fake engine): hold, restart, fatal,
hang, release, no orphans."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from kgtest import Sup, alive, proc_key, wait_until

from keepgpu.client import NoSupervisor

FAST = ["--heartbeat", "0.2", "--hang-timeout", "2", "--restart-delay", "0.1"]


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def test_four_fake_gpus_hold_pinned_and_supervisor_never_loads_torch(start_sup):
    sup: Sup = start_sup("--gpus", "all", *FAST, env={"KEEPGPU_FAKE_GPUS": "4"})
    gpus = sup.wait_states("holding")
    assert [g["gpu"] for g in gpus] == [0, 1, 2, 3]
    for g in gpus:
        assert g["held_bytes"] == 1024**3
        assert g["uuid"].startswith("GPU-")
        assert environ_of(g["pid"])["CUDA_VISIBLE_DEVICES"] == g["device_entry"] == str(g["gpu"])
        assert psutil.Process(g["pid"]).ppid() == sup.pid
        assert os.getpgid(g["pid"]) == g["pid"], "each worker leads its own process group"
    maps = Path(f"/proc/{sup.pid}/maps").read_text()
    assert "libtorch" not in maps and "libc10" not in maps and "libcuda" not in maps
    assert len({g["pid"] for g in gpus}) == 4


def test_gpus_map_through_the_supervisors_visible_list(start_sup):
    sup: Sup = start_sup("--gpus", "1,0", *FAST, env={"CUDA_VISIBLE_DEVICES": "3,5"})
    gpus = {g["gpu"]: g for g in sup.wait_states("holding")}
    assert set(gpus) == {0, 1}
    assert environ_of(gpus[1]["pid"])["CUDA_VISIBLE_DEVICES"] == "5"
    assert environ_of(gpus[0]["pid"])["CUDA_VISIBLE_DEVICES"] == "3"


def test_sigkilled_worker_is_replaced_and_counted(start_sup):
    sup: Sup = start_sup("--gpus", "0,1", *FAST)
    before = {g["gpu"]: g for g in sup.wait_states("holding")}
    os.kill(before[1]["pid"], signal.SIGKILL)
    t0 = time.monotonic()

    def back() -> dict | None:
        g = sup.gpus()[1]
        ok = g["state"] == "holding" and g["pid"] not in (None, before[1]["pid"])
        return g if ok else None

    g1 = wait_until(back, 10)
    took = time.monotonic() - t0
    assert g1["restarts"] == 1
    assert g1["incarnation"] == 2
    assert g1["last_exit"] == {"signal": "SIGKILL"}
    assert sup.gpus()[0]["pid"] == before[0]["pid"], "the sibling is untouched"
    assert took < 5


def test_crash_looping_worker_goes_fatal_alone_and_start_revives_it(start_sup):
    crash = "1/1:0.1,1/2:0.1,1/3:0.1"  # GPU entry 1 crashes in its first three incarnations
    sup: Sup = start_sup("--gpus", "0,1,2", *FAST, "--max-restarts", "2",
                         env={"KEEPGPU_FAKE_CRASH_AFTER": crash})
    gpus = sup.wait_states({0: "holding", 1: "fatal", 2: "holding"}, timeout=20)
    assert gpus[1]["restarts"] == 2
    assert gpus[1]["last_exit"] == {"code": 3}
    assert "gave up after 2 restarts" in gpus[1]["error"]
    assert gpus[1]["pid"] is None
    assert sup.proc.poll() is None
    result = sup.call("start", {"gpus": [1]})
    assert result["gpus"] == [{"gpu": 1, "result": "started", "incarnation": 4}]
    g1 = sup.wait_states({1: "holding"}, timeout=10)[1]
    assert g1["incarnation"] == 4 and g1["error"] is None


def test_exit_78_is_fatal_at_once_with_the_workers_message(start_sup):
    sup: Sup = start_sup("--gpus", "0,1", *FAST, env={"KEEPGPU_FAKE_EXIT_CONFIG": "0:1"})
    gpus = sup.wait_states({0: "fatal", 1: "holding"})
    assert gpus[0]["restarts"] == 0
    assert gpus[0]["reason"] == "config"
    assert "does not exist" in gpus[0]["error"]


def test_all_gpus_fatal_ends_the_supervisor_with_exit_4(start_sup):
    sup: Sup = start_sup("--gpus", "0", *FAST, env={"KEEPGPU_FAKE_EXIT_CONFIG": "1"})
    assert sup.proc.wait(15) == 4


def test_hung_worker_is_detected_dumped_and_replaced(start_sup):
    sup: Sup = start_sup("--gpus", "0,1", "--heartbeat", "0.2", "--hang-timeout", "1.5",
                         "--join-timeout", "0.5", "--kill-timeout", "1", "--restart-delay", "0.1",
                         env={"KEEPGPU_FAKE_HANG_AFTER": "0/1:0.5"})
    first = sup.wait_states("holding")[0]
    t_ready = time.monotonic()
    g0 = wait_until(lambda: (g := sup.gpus()[0])["incarnation"] == 2 and g, 10)
    detected = time.monotonic() - t_ready
    assert g0["restarts"] == 1
    assert g0["pid"] != first["pid"]
    # hang at 0.5 s after READY + 1.5 s hang timeout, then a 0.5 s join before SIGKILL
    assert detected < 0.5 + 1.5 + 0.5 + 1.5
    wait_until(lambda: sup.gpus()[0]["state"] == "holding", 5)
    assert sup.gpus()[0]["last_exit"] == {"signal": "SIGKILL"}
    log = sup.log()
    assert "no heartbeat for" in log
    assert "Current thread" in log or "Thread 0x" in log, "faulthandler stack dump expected"


def test_stop_releases_obedient_workers_within_join_timeout(start_sup):
    sup: Sup = start_sup("--gpus", "0,1,2,3", *FAST, "--join-timeout", "3")
    gpus = sup.wait_states("holding")
    keys = [proc_key(g["pid"]) for g in gpus]
    t0 = time.monotonic()
    result = sup.call("stop", timeout=10)
    took = time.monotonic() - t0
    assert [g["outcome"] for g in result["gpus"]] == ["released"] * 4
    assert all(g["seconds"] < 3 for g in result["gpus"])
    assert result["exiting"] is True
    assert took < 3
    assert sup.proc.wait(5) == 0
    assert not any(alive(k) for k in keys if k)


def test_worker_ignoring_stop_and_sigterm_is_killed_within_bounds(start_sup):
    sup: Sup = start_sup("--gpus", "0,1", *FAST, "--join-timeout", "1", "--kill-timeout", "1",
                         env={"KEEPGPU_FAKE_IGNORE_STOP": "1:1"})
    gpus = sup.wait_states("holding")
    keys = [proc_key(g["pid"]) for g in gpus]
    t0 = time.monotonic()
    out = sup.ctl("stop")
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr
    assert "gpu 0: released" in out.stdout
    assert "gpu 1: killed" in out.stdout
    assert took <= 1 + 1 + 1 + 1.5  # join + kill + 1 s, plus the ctl's own start-up
    assert sup.proc.wait(5) == 1
    assert not any(alive(k) for k in keys if k)


def test_partial_stop_keeps_the_rest_and_the_supervisor(start_sup):
    sup: Sup = start_sup("--gpus", "0,1", *FAST)
    gpus = sup.wait_states("holding")
    result = sup.call("stop", {"gpus": [0]}, timeout=10)
    assert result["gpus"][0]["outcome"] == "released" and result["exiting"] is False
    after = sup.gpus()
    assert after[0]["state"] == "stopped" and after[0]["pid"] is None
    assert after[1]["state"] == "holding" and after[1]["pid"] == gpus[1]["pid"]
    assert not alive(proc_key(gpus[0]["pid"]) or (0, 0.0))
    sup.call("start", {"gpus": [0]})
    sup.wait_states("holding")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_no_worker_survives_the_supervisor(start_sup, sig):
    sup: Sup = start_sup("--gpus", "0,1,2", *FAST)
    keys = [proc_key(g["pid"]) for g in sup.wait_states("holding")]
    assert all(keys)
    os.kill(sup.pid, sig)
    code = sup.proc.wait(10)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
    wait_until(lambda: not any(alive(k) for k in keys if k), 5)


def test_a_second_supervisor_of_the_same_name_is_refused(start_sup):
    first: Sup = start_sup("--gpus", "0", *FAST, name="dup")
    first.wait_states("holding")
    second: Sup = start_sup("--gpus", "0", *FAST, name="dup")
    assert second.proc.wait(10) == 1
    err = second.log().strip().splitlines()
    assert len(err) == 1 and "already running" in err[0] and str(first.pid) in err[0]
    assert first.call("ping")["pid"] == first.pid, "the first one keeps its socket"


def test_stale_socket_of_a_killed_supervisor_does_not_block_a_new_one(start_sup, runtime_dir):
    old: Sup = start_sup("--gpus", "0", *FAST, name="stale")
    old.wait_states("holding")
    os.kill(old.pid, signal.SIGKILL)
    old.proc.wait(5)
    assert (runtime_dir / "stale.ctl").exists(), "the killed one left its socket file"
    new: Sup = start_sup("--gpus", "0", *FAST, name="stale")
    new.wait_states("holding")
    assert new.call("ping")["pid"] == new.pid
    mode = (runtime_dir / "stale.ctl").stat().st_mode & 0o777
    assert mode == 0o600


def test_slow_worker_start_is_bounded_by_start_timeout(start_sup):
    sup: Sup = start_sup("--gpus", "0", *FAST, "--start-timeout", "4", "--join-timeout", "0.3",
                         "--max-restarts", "1",
                         env={"KEEPGPU_FAKE_START_DELAY": "0/1:30"})
    g = sup.wait_states({0: "holding"}, timeout=25)[0]
    assert g["incarnation"] == 2 and g["restarts"] == 1
    assert "no READY within 4s" in sup.log()


def test_second_sigterm_skips_the_join_wait(start_sup):
    sup: Sup = start_sup("--gpus", "0", *FAST, "--join-timeout", "20", "--kill-timeout", "2",
                         env={"KEEPGPU_FAKE_IGNORE_STOP": "1"})
    key = proc_key(sup.wait_states("holding")[0]["pid"])
    t0 = time.monotonic()
    sup.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert sup.proc.poll() is None, "the first SIGTERM waits for the join timeout"
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(10) == 1  # the worker had to be killed
    assert time.monotonic() - t0 < 5
    assert key and not alive(key)


def test_worker_stopped_at_spawn_dies_with_a_sigkilled_supervisor(start_sup):
    """PDEATHSIG is armed between fork and exec: a worker that never ran one Python statement
    (stopped at its very first line) still dies with its supervisor."""
    sup: Sup = start_sup("--gpus", "0,1", *FAST, "--start-timeout", "60",
                         env={"KEEPGPU_FAKE_STOP_AT_SPAWN": "1"})

    def spawned() -> list | None:
        try:
            gpus = sup.gpus()
        except NoSupervisor:
            return None
        return gpus if all(g["pid"] for g in gpus) else None

    gpus = wait_until(spawned, 10)
    keys = [proc_key(g["pid"]) for g in gpus]
    assert all(keys)
    wait_until(lambda: all(psutil.Process(k[0]).status() == psutil.STATUS_STOPPED
                           for k in keys if k), 10)
    os.kill(sup.pid, signal.SIGKILL)
    assert sup.proc.wait(10) == -signal.SIGKILL
    try:
        wait_until(lambda: not any(alive(k) for k in keys if k), 5)
    finally:
        for k in keys:
            if k and alive(k):
                os.kill(k[0], signal.SIGKILL)


def test_a_stalled_supervisor_does_not_blame_its_workers(start_sup):
    """SIGSTOP the supervisor for twice the hang timeout: on SIGCONT it reads what its workers
    sent meanwhile instead of replacing them all; a real hang is still caught afterwards."""
    sup: Sup = start_sup("--gpus", "all", "--heartbeat", "0.5", "--hang-timeout", "2",
                         "--join-timeout", "0.5", "--kill-timeout", "1", "--restart-delay", "0.1",
                         env={"KEEPGPU_FAKE_GPUS": "8", "KEEPGPU_FAKE_HANG_AFTER": "7/1:16"})
    before = {g["gpu"]: g["pid"] for g in sup.wait_states("holding", timeout=30)}
    for _ in range(2):
        os.kill(sup.pid, signal.SIGSTOP)
        time.sleep(4.5)
        os.kill(sup.pid, signal.SIGCONT)
        time.sleep(2.5)  # five heartbeats, more than the hang timeout
        gpus = sup.gpus()
        assert [g["restarts"] for g in gpus] == [0] * 8, sup.log()
        assert {g["gpu"]: g["pid"] for g in gpus} == before
    assert "did not run for" in sup.log()
    # GPU 7 stops its heartbeats 16 s after READY: replaced within its hang timeout + bounds.
    g7 = wait_until(lambda: (g := sup.gpus()[7])["incarnation"] == 2 and g, 20)
    assert g7["restarts"] == 1 and g7["pid"] != before[7]
    assert [g["restarts"] for g in sup.gpus()[:7]] == [0] * 7
