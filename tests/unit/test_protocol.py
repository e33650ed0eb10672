import json

import pytest

from keepgpu.protocol.control import (
    MAX_REQUEST_BYTES,
    ProtocolError,
    decode_reply,
    encode_request,
    error_reply,
    ok_reply,
    parse_request,
)
from keepgpu.protocol.runtime import RuntimeDirError, ensure_dir, ipc_endpoint, paths_for
from keepgpu.protocol.units import UnitError, parse_size, parse_vram
from keepgpu.protocol.wire import decode, encode, identity, parse_identity


@pytest.mark.parametrize(
    ("text", "value"),
    [("1GiB", 1024**3), ("750MB", 750_000_000), ("4096", 4096), ("1.5 GiB", 1536 * 1024**2),
     ("2g", 2_000_000_000), ("10kib", 10240)],
)
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["0", "10XB", "", "GiB", "-1GiB", "1e3", "0.1"])
def test_bad_sizes(text):
    with pytest.raises(UnitError):
        parse_size(text)


def test_vram_percent_and_resolve():
    v = parse_vram("25%")
    assert v.percent == 25 and v.resolve(1000) == 250
    assert parse_vram(2048).resolve(None) == 2048
    with pytest.raises(UnitError):
        parse_vram("0%")
    with pytest.raises(UnitError):
        parse_vram("25%").resolve(None)
    with pytest.raises(UnitError):
        parse_vram(True)  # type: ignore[arg-type]


def test_request_round_trip_and_defaults():
    req = parse_request(encode_request("pause", {"gpus": [0, "GPU-x"], "seconds": 5}, "r1"))
    assert (req.cmd, req.args, req.id) == ("pause", {"gpus": [0, "GPU-x"], "seconds": 5.0}, "r1")
    req = parse_request(b'{"cmd":"ping"}')
    assert req.args == {} and req.id is None


def test_set_normalises_vram():
    req = parse_request(encode_request("set", {"vram": "1GiB"}))
    assert req.args["vram"] == 1024**3


@pytest.mark.parametrize(
    ("frame", "code"),
    [(b"x" * (MAX_REQUEST_BYTES + 1), "bad_request"), (b"{}", "bad_request"),
     (b'{"cmd":"nope"}', "unknown_command"), (b'{"cmd":"ping","v":true}', "bad_request"),
     (b'{"cmd":"stop","args":{"gpus":[]}}', "invalid_argument"),
     (b'{"cmd":"set","args":{"busy_threshold":-2}}', "invalid_argument")],
)
def test_bad_requests(frame, code):
    with pytest.raises(ProtocolError) as info:
        parse_request(frame)
    assert info.value.code == code


def test_replies():
    assert decode_reply(ok_reply(3, {"a": 1})) == {"v": 1, "id": 3, "ok": True, "result": {"a": 1}}
    err = json.loads(error_reply(None, "conflict", "busy"))
    assert err["error"] == {"code": "conflict", "message": "busy"}
    with pytest.raises(ValueError):
        decode_reply(b'{"ok": true}')


def test_wire_messages():
    assert parse_identity(identity(3, 7)) == (3, 7)
    assert parse_identity(b"garbage") is None
    assert decode(encode("hb", progress=1), ("hb",)) == {"t": "hb", "progress": 1}
    assert decode(encode("hb"), ("ready",)) is None
    assert decode(b"\xff", ("hb",)) is None


def test_runtime_dir_rules(tmp_path):
    good = ensure_dir(tmp_path / "rt")
    assert (good.stat().st_mode & 0o777) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    with pytest.raises(RuntimeDirError, match="must be 700"):
        ensure_dir(loose)
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(RuntimeDirError, match="symlink"):
        ensure_dir(link)
    with pytest.raises(RuntimeDirError, match="invalid name"):
        paths_for("a/b", good)
    with pytest.raises(RuntimeDirError, match="107-byte"):
        ipc_endpoint(tmp_path / ("x" * 120))
    assert paths_for("job-1.0", good).control_endpoint.endswith("/job-1.0.ctl")


def test_runtime_dir_ignores_a_foreign_or_missing_xdg_dir(monkeypatch, tmp_path):
    from keepgpu.protocol.runtime import default_runtime_dir

    monkeypatch.delenv("KEEPGPU_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert str(default_runtime_dir()).startswith("/tmp/keepgpu-")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_runtime_dir() == tmp_path / "keepgpu"
    monkeypatch.setenv("KEEPGPU_RUNTIME_DIR", "/somewhere")
    assert str(default_runtime_dir()) == "/somewhere"
