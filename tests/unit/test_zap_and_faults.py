import pytest

from keepgpu.supervisor import zap
from keepgpu.worker.faults import load


@pytest.mark.parametrize(
    ("address", "mech", "ok"),
    [("localhost:1000:1000:42", "NULL", True), ("localhost:0:0:42", "NULL", True),
     ("localhost:1001:1001:42", "NULL", False), (":1000:1000:1", "NULL", True),
     ("127.0.0.1", "NULL", True), ("::1", "NULL", True), ("10.0.0.5", "NULL", False),
     ("localhost:1000:1000:42", "PLAIN", False), ("localhost", "NULL", False)],
)
def test_zap_allows_owner_and_root_only(address, mech, ok):
    assert zap.allows(address, mech, own_uid=1000) is ok


def test_zap_reply_frames():
    req = [b"1.0", b"7", b"keepgpu", b"localhost:5:5:1", b"", b"NULL"]
    assert zap.reply(req, own_uid=5)[:3] == [b"1.0", b"7", b"200"]
    assert zap.reply(req, own_uid=6)[2] == b"400"
    assert zap.reply([b"2.0", b"1"], own_uid=5)[2] == b"500"


def test_faults_most_specific_wins():
    env = {"KEEPGPU_FAKE_CRASH_AFTER": "5,1:2,1/3:0.5", "KEEPGPU_FAKE_IGNORE_STOP": "2:1"}
    assert load("0", 1, env).crash_after == 5
    assert load("1", 1, env).crash_after == 2
    assert load("1", 3, env).crash_after == 0.5
    assert load("2", 1, env).ignore_stop and not load("1", 1, env).ignore_stop
    with pytest.raises(ValueError, match="KEEPGPU_FAKE_HANG_AFTER"):
        load("0", 1, {"KEEPGPU_FAKE_HANG_AFTER": "soon"})
