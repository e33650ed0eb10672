"""Pure parts of yield / -- CMD / --max-hold: durations, the protocol schema, exit codes."""

from __future__ import annotations

import pytest

from keepgpu.protocol.control import MAX_SECONDS, ProtocolError, encode_request, parse_request
from keepgpu.protocol.units import UnitError, parse_duration
from keepgpu.supervisor.command import exit_code, spawn_failure


@pytest.mark.parametrize(("text", "seconds"), [
    ("90m", 5400), ("8h", 28800), ("1h30m", 5400), ("3600", 3600), ("1.5", 1.5),
    ("2d", 172800), ("45s", 45), (" 5 m ", 300), ("10min", 600),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, MAX_SECONDS) == seconds


@pytest.mark.parametrize("text", ["", "0", "0m", "-3", "x", "5x", "1h-", "31d", "inf", "nan"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UnitError):
        parse_duration(text, MAX_SECONDS)


def test_yield_schema() -> None:
    req = parse_request(encode_request("yield", {"pid": 1234, "gpus": [0]}))
    assert req.args == {"pid": 1234, "gpus": [0]}
    for args in ({}, {"pid": 0}, {"pid": -1}, {"pid": 1.5}, {"pid": "7"}, {"pid": True},
                 {"pid": 2**40}, {"pid": 5, "extra": 1}):
        with pytest.raises(ProtocolError) as err:
            parse_request(encode_request("yield", args))
        assert err.value.code == "invalid_argument"


def test_set_max_hold_schema() -> None:
    assert parse_request(encode_request("set", {"max_hold": 60})).args == {"max_hold": 60.0}
    assert parse_request(encode_request("set", {"max_hold": None})).args == {"max_hold": None}
    for args in ({"max_hold": 0}, {"max_hold": -1}, {"max_hold": "1h"},
                 {"max_hold": MAX_SECONDS + 1}, {"max_hold": 60, "gpus": [0]}):
        with pytest.raises(ProtocolError) as err:
            parse_request(encode_request("set", args))
        assert err.value.code == "invalid_argument"


def test_exit_codes_follow_the_shell() -> None:
    assert [exit_code(c) for c in (0, 3, -9, -15)] == [0, 3, 137, 143]
    assert spawn_failure(FileNotFoundError()) == 127
    assert spawn_failure(PermissionError()) == 126
