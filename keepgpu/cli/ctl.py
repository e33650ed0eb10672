"""`keepgpu-ctl`: talk to a running supervisor over its control socket.

Exit codes: 0 ok; 1 command failed / refused during the handshake (uid or CURVE key) / some GPU
not released cleanly; 2 usage; 3 no supervisor
answering; 4 every GPU fatal (wait --ready).
"""

from __future__ import annotations

import json
import time
from typing import Any

import click
import psutil

from keepgpu._version import __version__
from keepgpu.cli.common import (
    EXIT_ALL_FATAL,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_NO_SUPERVISOR,
    fail,
    run_standalone,
)
from keepgpu.cli.gpus import gpus_command
from keepgpu.cli.metrics import metrics_command
from keepgpu.cli.table import render_status, render_stop
from keepgpu.client import Client, CommandFailed, NoSupervisor, endpoint_for
from keepgpu.protocol.control import MODES
from keepgpu.protocol.endpoint import EndpointError
from keepgpu.protocol.endpoint import parse as parse_endpoint
from keepgpu.protocol.runtime import RuntimeDirError
from keepgpu.protocol.units import UnitError, parse_vram


class Ctx:
    def __init__(self, endpoint: str, timeout: float, as_json: bool) -> None:
        self.client = Client(endpoint, timeout)
        self.timeout = timeout
        self.as_json = as_json

    def call(self, cmd: str, args: dict[str, Any] | None = None, wait: float | None = None
             ) -> dict[str, Any]:
        try:
            return self.client.call(cmd, args, wait)
        except NoSupervisor as exc:
            fail(EXIT_NO_SUPERVISOR, f"no supervisor answering: {exc}")
        except CommandFailed as exc:
            fail(EXIT_FAILED, exc.message if exc.code != "bad_reply" else str(exc))

    def show(self, result: dict[str, Any], text: str) -> None:
        click.echo(json.dumps(result, indent=2) if self.as_json else text)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Whether process `pid` is gone (or a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def _gpus(value: str | None) -> list[int | str] | None:
    if value is None:
        return None
    out: list[int | str] = []
    for token in value.split(","):
        token = token.strip()
        if not token:
            raise click.BadParameter(f"empty entry in {value!r}", param_hint="--gpus")
        out.append(int(token) if token.isdigit() else token)
    return out


def _args(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


gpus_option = click.option("--gpus", default=None, help="ordinals or UUIDs, comma separated")
json_option = click.option("--json", "as_json", is_flag=True, help="print the JSON result")


@click.group(context_settings={"auto_envvar_prefix": "KEEPGPU_CTL"})
@click.option("--name", default="default", help="supervisor name")
@click.option("--endpoint", default=None, help="control endpoint (overrides --name)")
@click.option("--timeout", type=click.FloatRange(0.01, 3600), default=5.0,
              help="seconds to wait for an answer")
@click.version_option(__version__, prog_name="keepgpu-ctl")
@click.pass_context
def cli(ctx: click.Context, name: str, endpoint: str | None, timeout: float) -> None:
    """Control a keepgpu supervisor."""
    try:
        ep = endpoint or endpoint_for(name)
        parse_endpoint(ep)
    except (RuntimeDirError, EndpointError) as exc:
        fail(EXIT_CONFIG, str(exc))
    ctx.obj = Ctx(ep, timeout, False)
    ctx.call_on_close(ctx.obj.client.close)


@cli.command()
@click.pass_obj
def ping(obj: Ctx) -> int:
    """Is the supervisor answering?"""
    result = obj.call("ping")
    click.echo(f"pong from {result.get('name')} (pid {result.get('pid')})")
    return 0


@cli.command()
@gpus_option
@json_option
@click.pass_obj
def status(obj: Ctx, gpus: str | None, as_json: bool) -> int:
    """State and telemetry of every GPU."""
    obj.as_json = as_json
    result = obj.call("status", _args(gpus=_gpus(gpus)))
    obj.show(result, render_status(result))
    return 0


@cli.command()
@gpus_option
@json_option
@click.pass_obj
def stop(obj: Ctx, gpus: str | None, as_json: bool) -> int:
    """Release GPUs (all, and end the supervisor, when --gpus is not given). Returns once the
    workers are gone; exit 1 when any was killed or is unkillable."""
    obj.as_json = as_json
    sup = obj.call("status").get("supervisor", {})
    cfg = sup.get("config", {})
    bound = float(cfg.get("join_timeout_s", 5)) + float(cfg.get("kill_timeout_s", 5))
    result = obj.call("stop", _args(gpus=_gpus(gpus)), wait=bound + obj.timeout)
    if result.get("exiting") and isinstance(sup.get("pid"), int):
        result["supervisor_exited"] = _wait_gone(sup["pid"], obj.timeout)
    obj.show(result, render_stop(result))
    clean = all(g.get("outcome") == "released" for g in result.get("gpus", []))
    return 0 if clean else EXIT_FAILED


@cli.command()
@gpus_option
@json_option
@click.pass_obj
def start(obj: Ctx, gpus: str | None, as_json: bool) -> int:
    """Start stopped or fatal GPUs again."""
    obj.as_json = as_json
    result = obj.call("start", _args(gpus=_gpus(gpus)))
    lines = [f"gpu {g['gpu']}: {g['result']}" for g in result.get("gpus", [])]
    obj.show(result, "\n".join(lines))
    return 0


@cli.command()
@gpus_option
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="resume by itself after this long")
@json_option
@click.pass_obj
def pause(obj: Ctx, gpus: str | None, seconds: float | None, as_json: bool) -> int:
    """Stop GPU activity (memory stays held)."""
    obj.as_json = as_json
    result = obj.call("pause", _args(gpus=_gpus(gpus), seconds=seconds))
    obj.show(result, _applied("paused", result))
    return 0


@cli.command()
@gpus_option
@json_option
@click.pass_obj
def resume(obj: Ctx, gpus: str | None, as_json: bool) -> int:
    """End a pause."""
    obj.as_json = as_json
    result = obj.call("resume", _args(gpus=_gpus(gpus)))
    obj.show(result, _applied("resumed", result))
    return 0


def _applied(verb: str, result: dict[str, Any]) -> str:
    return "\n".join(
        f"gpu {g['gpu']}: {verb if g.get('applied') else 'not running (' + g['state'] + ')'}"
        for g in result.get("gpus", [])
    )


@cli.command(name="set")
@gpus_option
@click.option("--vram", default=None)
@click.option("--mode", type=click.Choice(MODES), default=None)
@click.option("--target-util", type=click.FloatRange(1, 100), default=None)
@click.option("--busy-threshold", type=click.FloatRange(-1, 100), default=None)
@click.option("--max-temp", type=click.FloatRange(1, 150), default=None)
@click.option("--on-pressure", type=click.Choice(["yield", "hold"]), default=None)
@json_option
@click.pass_obj
def set_(obj: Ctx, /, gpus: str | None, as_json: bool, **changes: Any) -> int:
    """Change settings of running workers without restarting them."""
    obj.as_json = as_json
    args = _args(**changes)
    if "vram" in args:
        try:
            parse_vram(args["vram"])
        except UnitError as exc:
            raise click.BadParameter(str(exc), param_hint="--vram") from None
    if not args:
        raise click.UsageError("give at least one setting to change")
    result = obj.call("set", _args(gpus=_gpus(gpus), **args))
    obj.show(result, _applied("updated", result))
    return 0


@cli.command()
@click.option("--ready", is_flag=True, required=True, help="wait until every GPU holds")
@click.option("--timeout", "--wait-timeout", "wait_timeout", type=click.FloatRange(0, 86400),
              default=300.0, help="give up after this many seconds (exit 1, or 3 if no supervisor)")
@click.pass_obj
def wait(obj: Ctx, ready: bool, wait_timeout: float) -> int:
    """Wait until every GPU is holding (exit 0), some failed (1) or all are fatal (4)."""
    deadline = time.monotonic() + wait_timeout
    while True:
        try:
            result = obj.client.call("status")
        except NoSupervisor:
            result = None
        except CommandFailed as exc:
            fail(EXIT_FAILED, exc.message)
        if result is not None:
            states = [g["state"] for g in result.get("gpus", [])]
            if states and all(s == "fatal" for s in states):
                fail(EXIT_ALL_FATAL, "every GPU is fatal")
            if states and all(s in ("holding", "backoff", "fatal") for s in states):
                bad = [str(g["gpu"]) for g in result["gpus"] if g["state"] == "fatal"]
                if bad:
                    fail(EXIT_FAILED, f"GPU(s) {','.join(bad)} fatal; the others are holding")
                click.echo(f"ready: {len(states)} GPU(s) holding")
                return 0
        if time.monotonic() >= deadline:
            what = "no supervisor answering" if result is None else "not every GPU is holding"
            fail(EXIT_NO_SUPERVISOR if result is None else EXIT_FAILED,
                 f"{what} after {wait_timeout:g}s")
        time.sleep(0.1)


cli.add_command(gpus_command)
cli.add_command(metrics_command)


def main() -> None:
    run_standalone(cli, "keepgpu-ctl")


if __name__ == "__main__":  # pragma: no cover
    main()
