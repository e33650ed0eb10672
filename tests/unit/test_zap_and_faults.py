import pytest

from keepgpu.supervisor import zap
from keepgpu.worker.faults import load

IPC, TCP = zap.DOMAIN, zap.TCP_DOMAIN
KEY, OTHER_KEY = b"k" * 32, b"o" * 32


@pytest.mark.parametrize(
    ("domain", "address", "mech", "creds", "ok"),
    [(IPC, "localhost:1000:1000:42", "NULL", [], True), (IPC, "localhost:0:0:42", "NULL", [], True),
     (IPC, "localhost:1001:1001:42", "NULL", [], False), (IPC, ":1000:1000:1", "NULL", [], True),
     (IPC, "localhost:1000:1000:42", "PLAIN", [], False), (IPC, "localhost", "NULL", [], False),
     # tcp carries no uid: loopback and even a uid-looking address mean nothing without CURVE
     (TCP, "127.0.0.1", "NULL", [], False), (TCP, "::1", "NULL", [], False),
     (TCP, "localhost:1000:1000:42", "NULL", [], False),
     (TCP, "10.0.0.5", "CURVE", [KEY], True), (TCP, "127.0.0.1", "CURVE", [OTHER_KEY], False),
     (TCP, "127.0.0.1", "CURVE", [], False), (IPC, "localhost:1000:1000:42", "CURVE", [KEY], False),
     (b"other", "localhost:1000:1000:42", "NULL", [], False)],
)
def test_zap_allows_owner_and_root_on_ipc_and_known_keys_on_tcp(domain, address, mech, creds, ok):
    assert zap.allows(domain, address, mech, creds, 1000, lambda: {KEY}) is ok


def test_zap_refuses_curve_when_no_socket_serves_it():
    assert not zap.allows(TCP, "127.0.0.1", "CURVE", [KEY], 1000, None)


def test_zap_reply_frames():
    req = [b"1.0", b"7", b"keepgpu", b"localhost:5:5:1", b"", b"NULL"]
    assert zap.reply(req, own_uid=5)[:3] == [b"1.0", b"7", b"200"]
    assert zap.reply(req, own_uid=6)[2] == b"400"
    assert zap.reply([b"2.0", b"1"], own_uid=5)[2] == b"500"
    curve = [b"1.0", b"8", TCP, b"127.0.0.1", b"", b"CURVE", KEY]
    assert zap.reply(curve, 5, lambda: {KEY})[2] == b"200"
    assert zap.reply(curve, 5, lambda: {OTHER_KEY})[2] == b"400"


def test_faults_most_specific_wins():
    env = {"KEEPGPU_FAKE_CRASH_AFTER": "5,1:2,1/3:0.5", "KEEPGPU_FAKE_IGNORE_STOP": "2:1"}
    assert load("0", 1, env).crash_after == 5
    assert load("1", 1, env).crash_after == 2
    assert load("1", 3, env).crash_after == 0.5
    assert load("2", 1, env).ignore_stop and not load("1", 1, env).ignore_stop
    with pytest.raises(ValueError, match="KEEPGPU_FAKE_HANG_AFTER"):
        load("0", 1, {"KEEPGPU_FAKE_HANG_AFTER": "soon"})


def test_refusal_log_names_each_peer_once_then_summarises_at_most_every_minute():
    from keepgpu.supervisor.zap import RefusalLog

    rl = RefusalLog(every_s=60.0)
    assert rl.note("127.0.0.1", "NULL", 0.0) == "refused a control peer: 127.0.0.1 (NULL)"
    assert rl.note("localhost:65534:65534:10", "NULL", 0.1) is not None  # another peer
    # The same uid from another pid is the same peer; the same address again is counted only.
    assert all(rl.note(f"localhost:65534:65534:{pid}", "NULL", 1.0) is None
               for pid in range(11, 500))
    assert rl.note("127.0.0.1", "NULL", 30.0) is None
    line = rl.note("127.0.0.1", "NULL", 61.5)
    assert line is not None and line.startswith("refused 491 more control handshake(s)")
    assert rl.note("127.0.0.1", "NULL", 62.0) is None
