"""Property-based fuzz of the control protocol against a real supervisor (fake engine, 2 GPUs)
over real ZeroMQ (keepgpu issue 9).

Every reply must be strict JSON (no NaN), a v1 envelope with a documented error code and never
`internal`; a request built to be invalid is refused, one built to be valid is served; garbage
never changes state: the same supervisor and worker pids, incarnations and no restarts at the
end. `stop` and `start` only ever appear in forms that must be refused. Requests of 5 or more
frames must get no reply (documented in docs/protocol.md).

KEEPGPU_FUZZ_REQUESTS (default 10 000) sets how many requests one run sends.
"""

from __future__ import annotations

import json
import os
import string
from collections import Counter
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kgtest import Sup

from keepgpu.protocol.control import ERROR_CODES

TOTAL = int(os.environ.get("KEEPGPU_FUZZ_REQUESTS", "10000"))
BATCH = 20
NAN = "__kg_nan__"  # a string replaced by a bare NaN/Infinity token in the JSON text

# ---- strategies ----------------------------------------------------------------------------

gpu_sets = st.sampled_from([None, [0], [1], [0, 1], [1, 0]])
valid_args = {
    "ping": st.just({}),
    "status": st.fixed_dictionaries({}, optional={"gpus": gpu_sets.filter(bool)}),
    "pause": st.fixed_dictionaries({}, optional={
        "gpus": gpu_sets.filter(bool),
        "seconds": st.floats(0.001, 2592000) | st.integers(1, 2592000)}),
    "resume": st.fixed_dictionaries({}, optional={"gpus": gpu_sets.filter(bool)}),
    "set": st.fixed_dictionaries(
        {"target_util": st.floats(1, 100) | st.integers(1, 100)},
        optional={"gpus": gpu_sets.filter(bool),
                  "vram": st.sampled_from(["1MiB", "64MiB", "256MiB", 4096, "0.1%"]),
                  "mode": st.sampled_from(["duty", "sm", "compute", "pstate"]),
                  "busy_threshold": st.floats(-1, 100),
                  "max_temp": st.integers(1, 150),
                  "on_pressure": st.sampled_from(["yield", "hold"])}),
}

huge_ints = st.integers(min_value=10**300, max_value=10**500) | st.integers(max_value=-1)
json_leaf = (st.none() | st.booleans() | st.integers() | huge_ints
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
             | st.just(NAN))
json_any = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
bad_values = (huge_ints | st.just(NAN) | st.text(max_size=10) | st.booleans()
              | st.lists(json_leaf, max_size=3) | st.dictionaries(st.text(max_size=3), json_leaf,
                                                                  max_size=2)
              | st.sampled_from([-5, 0, 101, 1e9, 2592001, 10**400, -1e308, [], [2], [0, 7],
                                 ["GPU-nope"], [0, 0], ["x" * 129], [""]]))


@st.composite
def valid_request(draw: Any) -> tuple[dict[str, Any], str]:
    cmd = draw(st.sampled_from(sorted(valid_args)))
    return {"v": 1, "cmd": cmd, "args": draw(valid_args[cmd])}, "ok"


@st.composite
def invalid_request(draw: Any) -> tuple[dict[str, Any], str]:
    """A request with at least one thing that must be refused (so it changes nothing)."""
    cmd = draw(st.sampled_from(["ping", "status", "pause", "resume", "set", "stop", "start"]))
    req: dict[str, Any] = {"v": 1, "cmd": cmd, "args": {}}
    how = draw(st.sampled_from(["top_key", "version", "cmd", "args_type", "arg_key", "arg_value",
                                "no_gpu"]))
    if how == "no_gpu" and cmd in ("status", "pause", "resume"):
        req["args"]["gpus"] = draw(st.sampled_from([[2], [0, 5], ["GPU-nope"], [10**30]]))
    elif how == "top_key":
        req[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in req))] = 1
    elif how == "version":
        req["v"] = draw(json_any.filter(lambda v: v != 1 or isinstance(v, bool)))
    elif how == "cmd":
        req["cmd"] = draw((st.text(max_size=12) | json_any).filter(
            lambda c: not isinstance(c, str) or c not in (*valid_args, "stop", "start")))
    elif how == "args_type":
        req["args"] = draw(json_any.filter(lambda a: a is not None and not isinstance(a, dict)
                                           and a != NAN) | st.just(NAN))
    elif how in ("arg_key", "no_gpu") or cmd in ("ping", "stop", "start"):
        req["args"]["zz_" + draw(st.text(string.ascii_lowercase, max_size=6))] = 1
    else:
        name = draw(st.sampled_from(
            {"status": ["gpus"], "pause": ["gpus", "seconds"], "resume": ["gpus"],
             "set": ["gpus", "vram", "mode", "target_util", "busy_threshold", "max_temp",
                     "on_pressure"]}[cmd]))
        req["args"][name] = draw(bad_values.filter(lambda v, n=name: _surely_bad(n, v)))
    return req, "error"


def _surely_bad(name: str, value: Any) -> bool:
    """Whether `value` is certainly refused for argument `name` (the generator's oracle)."""
    if value == NAN:
        return True
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if name == "gpus":  # valid only as a non-empty, duplicate-free list of 0, 1, "0", "1"
        if not isinstance(value, list) or not value:
            return True
        known = all(not isinstance(v, bool) and v in (0, 1, "0", "1") for v in value)
        return not known or len(value) != len({repr(v) for v in value})
    if name == "seconds":
        return not number or not 0 < value <= 2592000
    if name == "target_util":
        return not number or not 1 <= value <= 100
    if name == "busy_threshold":
        return not number or not -1 <= value <= 100
    if name == "max_temp":
        return not number or not 1 <= value <= 150
    if name == "vram":
        return not isinstance(value, str | int) or isinstance(value, bool) or (
            isinstance(value, int) and (value < 1 or value > 2**63 - 1)) or (
            isinstance(value, str) and not value.strip()[:1].isdigit())
    return value not in ("duty", "sm", "compute", "pstate", "yield", "hold")


def encode(obj: Any, req_id: Any) -> tuple[bytes, bool]:
    """The JSON text, and whether a bare NaN went into it (then the id cannot be read back)."""
    text = json.dumps({**obj, "id": req_id} if isinstance(obj, dict) else obj)
    nan = f'"{NAN}"' in text
    return text.replace(f'"{NAN}"', "NaN").encode(), nan


@st.composite
def raw_garbage(draw: Any) -> tuple[bytes, str]:
    """Bytes that are not a valid request: not UTF-8, not strict JSON, too deep, too big."""
    kind = draw(st.sampled_from(["bytes", "non_utf8", "nan", "dup", "deep", "bigint", "big",
                                 "not_object", "text"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64)), "error"
    if kind == "non_utf8":
        return b'{"v":1,"cmd":"ping","id":"\xff\xfe"}', "error"
    if kind == "nan":
        tok = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        return f'{{"v":1,"id":{tok},"cmd":"ping"}}'.encode(), "error"
    if kind == "dup":
        key = draw(st.sampled_from(["v", "id", "cmd", "args"]))
        return f'{{"v":1,"cmd":"ping","args":{{}},"id":1,"{key}":null}}'.encode(), "error"
    if kind == "deep":
        depth = draw(st.integers(1000, 30000))
        return b"[" * depth + b"]" * depth, "error"
    if kind == "bigint":
        where = draw(st.sampled_from(["id", "v", "gpus"]))
        digits = "7" * draw(st.integers(4301, 6000))
        body = {"id": f'{{"v":1,"id":{digits},"cmd":"ping"}}',
                "v": f'{{"v":{digits},"cmd":"ping"}}',
                "gpus": f'{{"v":1,"cmd":"status","args":{{"gpus":[{digits}]}}}}'}[where]
        return body.encode(), "error"
    if kind == "big":
        return b'{"v":1,"cmd":"ping","id":"' + b"x" * (64 * 1024) + b'"}', "error"
    if kind == "not_object":
        return encode(draw(json_any.filter(lambda v: not isinstance(v, dict))), None)[0], "error"
    return draw(st.text(max_size=40)).encode(), "error"


@st.composite
def message(draw: Any) -> tuple[Any, bool, str]:
    """(a request object, or raw bytes; whether it is raw; expected: ok|error)."""
    pick = draw(st.integers(0, 9))
    if pick < 8:
        obj, want = draw(valid_request() if pick < 4 else invalid_request())
        return obj, False, want
    raw, want = draw(raw_garbage())
    return raw, True, want


# Drawing one example costs ~10 ms here, so each drawn request is sent in every framing a
# client can use (5 sends): DEALER with delimiter (int and string id), without delimiter (list
# id), one extra envelope frame, and 5 frames (which must get no reply).
SHAPES = ("dealer", "dealer_str", "no_delim", "extra", "five")


def expand(item: tuple[Any, bool, str], n: int) -> list[tuple[list[bytes], str, Any]]:
    body, raw, want = item
    out = []
    for shape in SHAPES:
        req_id: Any = {"dealer_str": str(n), "no_delim": [n]}.get(shape, n)
        if raw:
            payload, req_id = body, None
        else:
            payload, nan = encode(body, req_id)
            req_id = None if nan else req_id  # refused as not strict JSON: no id read back
        frames = {"no_delim": [payload], "extra": [b"", b"x", payload],
                  "five": [b"", b"x", b"y", payload]}.get(shape, [b"", payload])
        # 5 or more frames at the ROUTER (identity + 4): dropped without a reply
        out.append((frames, "none" if shape == "five" else want, req_id))
    return out


def strict_loads(raw: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"non-strict JSON constant {name} in a reply")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


# ---- the test --------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_protocol_fuzz(start_sup: Any) -> None:
    sup: Sup = start_sup("--gpus", "0,1", "--heartbeat", "0.5")
    before = {g["gpu"]: (g["pid"], g["incarnation"]) for g in sup.wait_states("holding")}
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(sup.endpoint)
    counts: Counter[str] = Counter()
    syncs = [0]

    def sync() -> None:
        """Skip replies a failed (or shrinking) example left behind: read up to our marker."""
        syncs[0] += 1
        marker = f"sync-{syncs[0]}"
        sock.send_multipart([b"", json.dumps({"v": 1, "id": marker, "cmd": "ping"}).encode()])
        while True:
            assert sock.poll(10_000), "no reply to a ping"
            if json.loads(sock.recv_multipart()[-1]).get("id") == marker:
                return

    per_example = BATCH * len(SHAPES)

    @settings(max_examples=-(-TOTAL // per_example), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(message(), min_size=BATCH, max_size=BATCH))
    def batch(drawn: list[tuple[Any, bool, str]]) -> None:
        sync()
        msgs = [m for i, item in enumerate(drawn) for m in expand(item, i)]
        for frames, _, _ in msgs:
            sock.send_multipart(frames)
        for frames, want, req_id in msgs:
            if want == "none":
                counts["no reply (5+ frames)"] += 1
                continue
            assert sock.poll(10_000), f"no reply to {frames[-1][:200]!r}"
            got = sock.recv_multipart()
            assert got[:-1] == frames[:-1], "the reply keeps the request's envelope"
            reply = strict_loads(got[-1])
            assert reply["v"] == 1 and isinstance(reply["ok"], bool), reply
            assert reply["id"] == req_id, (reply, frames[-1][:200])
            if reply["ok"]:
                counts["ok"] += 1
                assert want == "ok", (frames[-1][:300], reply)
            else:
                code = reply["error"]["code"]
                counts[code] += 1
                assert code in ERROR_CODES and code != "internal", reply
                assert want == "error", (frames[-1][:300], reply)

    try:
        batch()
        assert not sock.poll(300), "a reply nobody asked for (a 5+ frame request answered?)"
    finally:
        sock.close(0)
    print(f"\nfuzz: {sum(counts.values())} requests; by reply: {dict(sorted(counts.items()))}")
    assert sum(counts.values()) >= TOTAL
    # Nothing restarted, nothing stopped: the same supervisor and the same workers.
    assert sup.proc.poll() is None
    now = sup.gpus()
    assert {g["gpu"]: (g["pid"], g["incarnation"]) for g in now} == before
    assert all(g["restarts"] == 0 for g in now)
    # Valid `set`s may have left a thermal or busy backoff (e.g. max_temp 20): undo them and
    # the pauses with valid commands; the same workers then hold again.
    sup.call("set", {"max_temp": 83, "busy_threshold": 10, "target_util": 30})
    sup.call("resume")
    after = sup.wait_states("holding", timeout=30)
    assert {g["gpu"]: (g["pid"], g["incarnation"]) for g in after} == before
