"""`keepgpu-ctl gpus`: fake devices with real keepers on some of them, and NVIDIA devices read
through a fake pynvml at the binding boundary (no supervisor needed for either)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fakes.fake_pynvml import FakeGpu
from fakes.fake_pynvml import install as install_fake
from kgtest import CTL

from keepgpu.cli import keepers
from keepgpu.cli.ctl import cli
from keepgpu.telemetry.fake import fake_device_uuid

GiB = 1024**3
OTHER_PID = 4_200_001  # above PID_MAX_LIMIT: never a real process


def gpus_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    out = subprocess.run([*CTL, "gpus", "--json", *args], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_lists_fake_devices_without_a_supervisor(base_env: dict[str, str]) -> None:
    env = {**base_env, "KEEPGPU_FAKE_GPUS": "3"}  # KEEPGPU_ENGINE=fake from base_env
    result = gpus_json(env)
    assert result["engine"] == "fake"
    assert [(d["gpu"], d["uuid"]) for d in result["devices"]] == [
        (i, fake_device_uuid(str(i))) for i in range(3)]
    assert all(d["held_by"] == [] and d["processes"] == [] for d in result["devices"])
    assert result["devices"][0]["mem_total_bytes"] == 80 * GiB
    text = subprocess.run([*CTL, "gpus", "--engine", "fake"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert text.returncode == 0
    assert len(text.stdout.splitlines()) == 4  # header + one line per device


def test_shows_which_keeper_holds_each_device(start_sup: Any, base_env: dict[str, str]) -> None:
    sup = start_sup("--gpus", "0,2", "--vram", "128MiB", env={"KEEPGPU_FAKE_GPUS": "3"})
    workers = {g["gpu"]: g["pid"] for g in sup.wait_states("holding")}
    result = gpus_json({**base_env, "KEEPGPU_FAKE_GPUS": "3"})
    devs = result["devices"]
    for gpu in (0, 2):
        assert devs[gpu]["held_by"] == [
            {"name": sup.name, "gpu": gpu, "state": "holding", "pid": workers[gpu]}]
        [proc] = devs[gpu]["processes"]
        assert proc["pid"] == workers[gpu] and proc["keeper"] == sup.name
        assert proc["used_bytes"] == 128 * 1024**2 and proc["uid"] == os.getuid()
    assert devs[1]["held_by"] == [] and devs[1]["processes"] == []


def test_no_gpu_is_one_line_exit_78(base_env: dict[str, str]) -> None:
    env = {**base_env, "KEEPGPU_ENGINE": "cuda", "KEEPGPU_FAKE_GPUS": "2"}
    from keepgpu.telemetry import TelemetryUnavailable, list_devices

    try:
        list_devices("nvidia")
        pytest.skip("NVML works here: there is a GPU")
    except TelemetryUnavailable:
        pass
    out = subprocess.run([*CTL, "gpus"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 78
    assert len(out.stderr.strip().splitlines()) == 1 and "cannot list nvidia GPUs" in out.stderr


def test_nvidia_devices_with_processes_and_users(monkeypatch: pytest.MonkeyPatch,
                                                 runtime_dir: Path) -> None:
    """Read through NVML (a fake pynvml): memory, utilization, each process with its user."""
    monkeypatch.setenv("KEEPGPU_RUNTIME_DIR", str(runtime_dir))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    install_fake(monkeypatch,
                 FakeGpu("GPU-aaaa", name="A100", util=40, mem_used=12 * GiB,
                         procs=[(os.getpid(), 2 * GiB), (OTHER_PID, 8 * GiB)]),
                 FakeGpu("GPU-bbbb", name="H100", util=0, mem_used=0, mem_total=94 * GiB))
    run = CliRunner().invoke(cli, ["gpus", "--engine", "cuda", "--json"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    devs = json.loads(run.output)["devices"]
    assert [(d["gpu"], d["uuid"], d["name"], d["util_pct"], d["mem_used_bytes"],
             d["mem_total_bytes"]) for d in devs] == [
        (0, "GPU-aaaa", "A100", 40.0, 12 * GiB, 80 * GiB),
        (1, "GPU-bbbb", "H100", 0.0, 0, 94 * GiB)]
    me, other = devs[0]["processes"]
    assert (me["pid"], me["used_bytes"], me["uid"]) == (os.getpid(), 2 * GiB, os.getuid())
    assert me["user"] == keepers.user_name(os.getuid()) and me["keeper"] is None
    assert (other["pid"], other["uid"], other["user"]) == (OTHER_PID, None, None)
    assert devs[1]["processes"] == []
    text = CliRunner().invoke(cli, ["gpus", "--engine", "cuda"], catch_exceptions=False)
    assert f"pid {OTHER_PID}  ?  8.0GiB" in text.output


def _socket_file(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_root_finds_every_users_keepers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As root, a runtime dir of another uid counts for that uid; a dead pid or a dir open to
    others is not a keeper."""
    theirs = tmp_path / "keepgpu-4242"
    theirs.mkdir(mode=0o700)
    for name, pid in (("job", os.getpid()), ("dead", 4200000), ("planted", os.getpid())):
        _socket_file(theirs / f"{name}.ctl")
        (theirs / f"{name}.pid").write_text(f"{pid}\n")
    (theirs / "link.ctl").symlink_to(theirs / "job.ctl")  # a symlink is never followed
    (theirs / "link.pid").write_text(f"{os.getpid()}\n")
    for path in [theirs, *theirs.iterdir()]:
        os.lchown(path, 4242, 4242)
    os.chown(theirs / "planted.ctl", 0, 0)  # not that user's own socket
    open_dir = tmp_path / "keepgpu-4343"
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)
    _socket_file(open_dir / "x.ctl")
    (open_dir / "x.pid").write_text(f"{os.getpid()}\n")
    monkeypatch.setattr(keepers, "ROOT_PATTERNS", (str(tmp_path / "keepgpu-*"),))
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    monkeypatch.setenv("KEEPGPU_RUNTIME_DIR", str(mine))
    found = keepers.discover(all_users=True)
    assert [(k.name, k.uid, k.user) for k in found] == [
        ("job", 4242, keepers.user_name(4242))]
    assert found[0].endpoint == f"ipc://{theirs}/job.ctl"
    assert keepers.discover(all_users=False) == []
