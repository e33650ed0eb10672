"""The control socket with raw ZeroMQ clients: every command, and hostile input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import zmq
from kgtest import CTL, Sup, wait_until

FAST = ["--heartbeat", "0.2", "--hang-timeout", "2", "--restart-delay", "0.1"]


def raw(sup: Sup, frame: bytes, kind: int = zmq.REQ, timeout: float = 3.0) -> dict:
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.linger = 0
    try:
        sock.connect(sup.endpoint)
        if kind == zmq.DEALER:
            sock.send_multipart([b"", frame])
        else:
            sock.send(frame)
        assert sock.poll(int(timeout * 1000)), "no reply"
        return json.loads(sock.recv_multipart()[-1])
    finally:
        sock.close(0)
        ctx.term()


def request(cmd, args=None, rid=7) -> bytes:
    return json.dumps({"v": 1, "id": rid, "cmd": cmd, "args": args or {}}).encode()


@pytest.fixture
def sup(start_sup) -> Sup:
    s: Sup = start_sup("--gpus", "0,1", *FAST)
    s.wait_states("holding")
    return s


def test_ping_and_status_with_req_and_dealer_clients(sup):
    for kind in (zmq.REQ, zmq.DEALER):
        reply = raw(sup, request("ping", rid="abc"), kind)
        assert reply == {"v": 1, "id": "abc", "ok": True,
                         "result": {"pong": True, "pid": sup.pid, "name": sup.name}}
    status = raw(sup, request("status", {"gpus": [1]}))["result"]
    assert [g["gpu"] for g in status["gpus"]] == [1]
    sup_info = status["supervisor"]
    assert sup_info["pid"] == sup.pid and sup_info["state"] == "running"
    assert sup_info["config"]["engine"] == "fake"
    fields = {"gpu", "device_entry", "uuid", "name", "state", "reason", "pid", "incarnation",
              "restarts", "last_exit", "heartbeat_age_s", "held_bytes", "util_pct",
              "own_util_pct", "mem_used_bytes", "mem_total_bytes", "temp_c", "power_w", "pstate",
              "duty_pct", "error"}
    assert fields <= set(status["gpus"][0])


def test_status_by_uuid_and_unknown_gpu(sup):
    uuid = sup.gpus()[1]["uuid"]
    reply = raw(sup, request("status", {"gpus": [uuid]}))
    assert reply["result"]["gpus"][0]["gpu"] == 1
    reply = raw(sup, request("status", {"gpus": [9]}))
    assert reply["ok"] is False and reply["error"]["code"] == "not_found"


def test_pause_resume_and_set_reach_the_workers(sup):
    reply = raw(sup, request("pause", {"gpus": [0]}))
    assert reply["result"]["gpus"] == [{"gpu": 0, "applied": True, "state": "holding"}]
    wait_until(lambda: sup.gpus()[0]["reason"] == "paused", 3)
    assert sup.gpus()[0]["state"] == "backoff"
    assert sup.gpus()[1]["state"] == "holding"
    assert raw(sup, request("resume"))["ok"]
    wait_until(lambda: sup.gpus()[0]["state"] == "holding", 3)
    pid = sup.gpus()[1]["pid"]
    assert raw(sup, request("set", {"gpus": [1], "vram": "512MiB"}))["ok"]
    wait_until(lambda: sup.gpus()[1]["held_bytes"] == 512 * 1024**2, 3)
    assert sup.gpus()[1]["pid"] == pid, "set does not restart the worker"


def test_pause_with_seconds_ends_by_itself(sup):
    assert raw(sup, request("pause", {"seconds": 0.5}))["ok"]
    wait_until(lambda: sup.gpus()[0]["reason"] == "paused", 3)
    wait_until(lambda: all(g["state"] == "holding" for g in sup.gpus()), 5)


def test_pause_survives_a_worker_restart(sup):
    raw(sup, request("pause", {"gpus": [0]}))
    old = sup.gpus()[0]["pid"]
    os.kill(old, 9)
    wait_until(lambda: (g := sup.gpus()[0])["pid"] not in (None, old) and g["state"] == "backoff"
               and g["reason"] == "paused", 10)


def test_start_of_a_running_gpu_is_a_no_op(sup):
    reply = raw(sup, request("start", {"gpus": [0]}))
    assert reply["result"]["gpus"] == [{"gpu": 0, "result": "already-holding"}]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"{not json", "bad_request"),
        (b"\xff\xfe\x00garbage\x80", "bad_request"),
        (b"[1, 2, 3]", "bad_request"),
        (b'"just a string"', "bad_request"),
        (json.dumps({"v": 1, "id": 1, "cmd": "reboot"}).encode(), "unknown_command"),
        (json.dumps({"v": 1, "id": 1, "cmd": 42}).encode(), "bad_request"),
        (json.dumps({"v": 2, "id": 1, "cmd": "ping"}).encode(), "bad_request"),
        (json.dumps({"v": 1, "cmd": "ping", "args": []}).encode(), "bad_request"),
        (json.dumps({"v": 1, "cmd": "ping", "extra": 1}).encode(), "bad_request"),
        (request("status", {"gpus": "0"}), "invalid_argument"),
        (request("status", {"gpus": [True]}), "invalid_argument"),
        (request("status", {"gpus": [0, 0]}), "invalid_argument"),
        (request("status", {"gpus": [-1]}), "invalid_argument"),
        (request("pause", {"seconds": "10"}), "invalid_argument"),
        (request("pause", {"seconds": -1}), "invalid_argument"),
        (request("set", {"vram": "10XB"}), "invalid_argument"),
        (request("set", {"vram": 0}), "invalid_argument"),
        (request("set", {"mode": "turbo"}), "invalid_argument"),
        (request("set", {"target_util": 101}), "invalid_argument"),
        (request("set", {}), "invalid_argument"),
        (request("ping", {"unexpected": 1}), "invalid_argument"),
        (b"{" * 100000, "bad_request"),  # also oversized
        (b" " * (64 * 1024 + 1), "bad_request"),
    ],
)
def test_bad_requests_get_error_replies_and_change_nothing(sup, frame, code):
    before = sup.gpus()
    reply = raw(sup, frame)
    assert reply["v"] == 1 and reply["ok"] is False
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    after = sup.gpus()
    assert [(g["pid"], g["state"]) for g in after] == [(g["pid"], g["state"]) for g in before]


def test_request_id_is_echoed_even_on_validation_errors(sup):
    reply = raw(sup, request("set", {"mode": "turbo"}, rid={"n": 5}))
    assert reply["id"] == {"n": 5}


def test_multi_frame_garbage_and_huge_messages_do_not_kill_the_supervisor(sup):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(sup.endpoint)
    sock.send_multipart([b"a", b"b", b"c", b"d", b"e", b"f"])
    sock.send_multipart([b"", b"x" * (2 * 1024 * 1024)])  # over the hard cap: peer dropped
    sock.close(0)
    ctx.term()
    time.sleep(0.2)
    assert sup.call("ping")["pid"] == sup.pid
    assert raw(sup, request("status"))["ok"]


def test_ctl_without_a_supervisor_exits_3_within_its_timeout(base_env):
    t0 = time.monotonic()
    out = subprocess.run([*CTL, "--name", "nobody-here", "--timeout", "1", "status"],
                         env=base_env, capture_output=True, text=True, timeout=20)
    assert out.returncode == 3
    assert len(out.stderr.strip().splitlines()) == 1 and "no supervisor" in out.stderr
    assert time.monotonic() - t0 < 10


def test_ctl_with_a_dead_supervisors_socket_exits_3_within_its_timeout(base_env, runtime_dir):
    # A socket file with nobody behind it: the connect succeeds lazily, the answer never comes.
    import socket

    path = runtime_dir / "ghost.ctl"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    t0 = time.monotonic()
    out = subprocess.run([*CTL, "--name", "ghost", "--timeout", "1", "ping"], env=base_env,
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 3, out.stderr
    assert time.monotonic() - t0 < 1 + 5  # 1 s wait plus interpreter start-up


def test_ctl_status_table_and_json(sup):
    out = sup.ctl("status")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"supervisor {sup.name}  pid {sup.pid}")
    assert lines[1].split()[:3] == ["GPU", "STATE", "HELD"]
    assert lines[2].split()[:2] == ["0", "holding"]
    data = json.loads(sup.ctl("status", "--json").stdout)
    assert len(data["gpus"]) == 2


def test_ctl_commands_round_trip(sup):
    assert sup.ctl("ping").returncode == 0
    assert "gpu 0: paused" in sup.ctl("pause", "--gpus", "0").stdout
    assert "gpu 0: resumed" in sup.ctl("resume", "--gpus", "0").stdout
    assert "gpu 1: updated" in sup.ctl("set", "--gpus", "1", "--target-util", "50").stdout
    out = sup.ctl("stop", "--gpus", "9")
    assert out.returncode == 1 and "no GPU 9" in out.stderr
    out = sup.ctl("stop", "--gpus", "1")
    assert out.returncode == 0 and "gpu 1: released" in out.stdout
    assert "gpu 1: started" in sup.ctl("start", "--gpus", "1").stdout
    out = sup.ctl("wait", "--ready", "--timeout", "10")
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_zap_refuses_other_users(sup, runtime_dir):
    # Open the dir and socket to everyone so that only ZAP stands in the way.
    os.chmod(runtime_dir, 0o755)
    os.chmod(runtime_dir / f"{sup.name}.ctl", 0o666)
    code = (
        "import os,sys,json,zmq; os.setgid(65534); os.setuid(65534);"
        "c=zmq.Context(); s=c.socket(zmq.REQ); s.linger=0; s.connect(sys.argv[1]);"
        "s.send(json.dumps({'v':1,'cmd':'ping'}).encode());"
        "print('answered' if s.poll(1500) else 'refused')"
    )
    out = subprocess.run([sys.executable, "-c", code, sup.endpoint], capture_output=True,
                         text=True, timeout=20)
    assert out.stdout.strip() == "refused", out.stderr
    assert "refused a control peer" in sup.log()
    assert sup.call("ping")["pid"] == sup.pid, "root and the owner still get in"


def test_set_vram_above_total_is_refused_and_not_kept(sup):
    reply = raw(sup, request("set", {"gpus": [0], "vram": "100GiB"}))
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_argument"
    assert "exceeds" in reply["error"]["message"]
    old = sup.gpus()[0]["pid"]
    os.kill(old, 9)
    g = wait_until(lambda: (x := sup.gpus()[0])["state"] == "holding" and x["pid"] != old and x, 10)
    assert g["held_bytes"] == 1024**3, "the refused setting did not leak into the restart"


def test_client_reuses_its_socket_and_skips_stale_replies(sup):
    from keepgpu.client import Client, NoSupervisor

    with Client(sup.endpoint, timeout=2) as client:
        assert client.call("ping")["pid"] == sup.pid
        first = client._sock
        assert client.call("status")["gpus"]
        assert client._sock is first, "one connection for many calls"
        os.kill(sup.pid, 19)  # SIGSTOP: the next call times out
        try:
            with pytest.raises(NoSupervisor):
                client.call("ping", timeout=0.3)
        finally:
            os.kill(sup.pid, 18)  # SIGCONT
        assert client.call("ping")["pid"] == sup.pid, "a fresh socket after a timeout"


def test_a_client_dropped_without_close_leaves_no_open_socket(sup):
    import gc
    import warnings

    from keepgpu.client import Client

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client = Client(sup.endpoint)
        assert client.call("ping")["pid"] == sup.pid
        sock = client._sock
        del client
        gc.collect()
    assert sock is not None and sock.closed


def test_pause_and_set_for_a_stopped_gpu_are_refused_not_stored(sup):
    assert sup.call("stop", {"gpus": [1]}, timeout=10)["gpus"][0]["outcome"] == "released"
    for args in (["pause", "--gpus", "1"], ["set", "--gpus", "1", "--vram", "512MiB"]):
        out = sup.ctl(*args)
        assert out.returncode == 1, out
        assert out.stderr.strip().splitlines() == [
            "keepgpu-ctl: error: GPU 1 is stopped; `start` it first"]
    reply = raw(sup, request("pause"))  # without gpus: GPU 1 is skipped, nothing kept for it
    assert reply["result"]["gpus"][1] == {"gpu": 1, "applied": False, "state": "stopped",
                                          "skipped": True}
    assert raw(sup, request("set", {"vram": "512MiB"}))["ok"]
    sup.call("start", {"gpus": [1]})
    g1 = sup.wait_states({1: "holding"})[1]
    time.sleep(0.6)  # a few heartbeats: a kept pause would show by now
    g1 = sup.gpus()[1]
    assert (g1["state"], g1["reason"], g1["held_bytes"]) == ("holding", None, 1024**3)
    assert sup.gpus()[0]["reason"] == "paused"


def test_set_vram_while_the_first_start_is_pending_is_refused(start_sup):
    s: Sup = start_sup("--gpus", "0", *FAST, env={"KEEPGPU_FAKE_START_DELAY": "0/1:3"})
    wait_until(lambda: s.ctl("ping").returncode == 0, 10)
    assert s.gpus()[0]["state"] == "starting"
    reply = raw(s, request("set", {"vram": "1000TiB"}))
    assert reply["ok"] is False and reply["error"]["code"] == "conflict", reply
    assert "retry once it holds" in reply["error"]["message"]
    assert raw(s, request("set", {"target_util": 50}))["ok"], "other settings are fine"
    s.wait_states("holding")
    out = s.ctl("set", "--vram", "1000TiB")
    assert out.returncode == 1 and "exceeds" in out.stderr
    os.kill(s.gpus()[0]["pid"], 9)
    g = wait_until(lambda: (x := s.gpus()[0])["incarnation"] == 2 and x["state"] == "holding"
                   and x, 10)
    assert g["restarts"] == 1 and g["held_bytes"] == 1024**3
