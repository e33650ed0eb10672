"""`keepgpu-ctl`: talk to a running supervisor over its control socket.

Exit codes: 0 ok; 1 command failed / refused during the handshake (uid or CURVE key) / some GPU
not released cleanly; 2 usage; 3 no supervisor
answering; 4 every GPU fatal (wait --ready). `yield -- CMD`: CMD's exit code (128+N after signal
N, 127 not found, 126 not executable).

Environment: the one rule of every keepgpu CLI, `KEEPGPU_<OPTION>`: KEEPGPU_NAME (shared with
keepgpu-supervise --name), KEEPGPU_CONTROL (keepgpu-supervise's --control: our --endpoint),
KEEPGPU_TIMEOUT; the older KEEPGPU_CTL_NAME / _ENDPOINT / _TIMEOUT still work and win. Command
options (--gpus...) are not read from KEEPGPU_*: a job's KEEPGPU_GPUS=0 must not narrow `stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
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
    EXIT_USAGE,
    FiniteRange,
    fail,
    from_env,
    run_standalone,
)
from keepgpu.cli.explain import explain
from keepgpu.cli.gpus import gpus_command
from keepgpu.cli.metrics import metrics_command
from keepgpu.cli.model import parse_gpu_refs
from keepgpu.cli.table import COLUMNS_HELP, render_status, render_stop
from keepgpu.cli.top import top
from keepgpu.client import BadEndpoint, Client, CommandFailed, NoSupervisor, endpoint_for
from keepgpu.protocol.control import MAX_SECONDS, MODES
from keepgpu.protocol.endpoint import EndpointError
from keepgpu.protocol.endpoint import parse as parse_endpoint
from keepgpu.protocol.runtime import RuntimeDirError
from keepgpu.protocol.units import UnitError, parse_duration, parse_vram
from keepgpu.supervisor.command import EXIT_NOT_FOUND, exit_code, terminal_sent


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
        except BadEndpoint as exc:
            fail(EXIT_USAGE, str(exc))
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
    """`--gpus` as protocol refs; what the supervisor would refuse as invalid is usage here."""
    try:
        return parse_gpu_refs(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus") from None


def _endpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """ipc://PATH, ipc://@NAME or tcp://HOST:PORT (keepgpu.protocol.endpoint's rules): anything
    else is one line and exit 78, as for a bad --name, never a ZeroMQ traceback."""
    if value is None:
        return None
    try:
        parse_endpoint(value)
    except EndpointError as exc:
        var = from_env(ctx, "endpoint")
        fail(EXIT_CONFIG, f"{var}: {exc}" if var else f"--endpoint: {exc}")
    return value


def _args(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


gpus_option = click.option("--gpus", default=None, help="ordinals or UUIDs, comma separated")
json_option = click.option("--json", "as_json", is_flag=True, help="print the JSON result")


@click.group(context_settings={"auto_envvar_prefix": "KEEPGPU_CTL"})
@click.option("--name", default="default", envvar=["KEEPGPU_CTL_NAME", "KEEPGPU_NAME"],
              help="supervisor name")
@click.option("--endpoint", default=None, envvar=["KEEPGPU_CTL_ENDPOINT", "KEEPGPU_CONTROL"],
              callback=_endpoint, help="control endpoint (overrides --name)")
@click.option("--timeout", type=FiniteRange(0.01, 3600), default=5.0,
              envvar=["KEEPGPU_CTL_TIMEOUT", "KEEPGPU_TIMEOUT"],
              help="seconds to wait for an answer")
@click.version_option(__version__, prog_name="keepgpu-ctl")
@click.pass_context
def cli(ctx: click.Context, name: str, endpoint: str | None, timeout: float) -> None:
    """Control a keepgpu supervisor."""
    try:
        ep = endpoint or endpoint_for(name)
    except RuntimeDirError as exc:
        var = from_env(ctx, "name")
        fail(EXIT_CONFIG, f"{var}: {exc}" if var else str(exc))
    ctx.obj = Ctx(ep, timeout, False)
    ctx.call_on_close(ctx.obj.client.close)


@cli.command()
@click.pass_obj
def ping(obj: Ctx) -> int:
    """Is the supervisor answering?"""
    result = obj.call("ping")
    click.echo(f"pong from {result.get('name')} (pid {result.get('pid')})")
    return 0


@cli.command(epilog=COLUMNS_HELP)
@gpus_option
@click.option("--wide", is_flag=True, help="more columns (wider than 80)")
@json_option
@click.pass_obj
def status(obj: Ctx, gpus: str | None, wide: bool, as_json: bool) -> int:
    """State and telemetry of every GPU, in 80 columns."""
    obj.as_json = as_json
    result = obj.call("status", _args(gpus=_gpus(gpus)))
    obj.show(result, render_status(result, wide=wide))
    return 0


@cli.command()
@gpus_option
@json_option
@click.pass_obj
def stop(obj: Ctx, gpus: str | None, as_json: bool) -> int:
    """Release GPUs (all, and end the supervisor, when --gpus is not given). Returns once the
    workers are gone; exit 1 when any was killed or is unkillable."""
    obj.as_json = as_json
    refs = _gpus(gpus)  # a usage error before anything is asked of the supervisor
    sup = obj.call("status").get("supervisor", {})
    cfg = sup.get("config", {})
    bound = float(cfg.get("join_timeout_s", 5)) + float(cfg.get("kill_timeout_s", 5))
    result = obj.call("stop", _args(gpus=refs), wait=bound + obj.timeout)
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
@click.option("--seconds", type=FiniteRange(0, MAX_SECONDS, min_open=True), default=None,
              help="resume by itself after this long (at most 30 days)")
@json_option
@click.pass_obj
def pause(obj: Ctx, gpus: str | None, seconds: float | None, as_json: bool) -> int:
    """Stop GPU activity (memory stays held). Naming a stopped or fatal GPU fails (exit 1);
    without --gpus those are skipped."""
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
@click.option("--target-util", type=FiniteRange(1, 100), default=None)
@click.option("--busy-threshold", type=FiniteRange(-1, 100), default=None)
@click.option("--max-temp", type=FiniteRange(1, 150), default=None)
@click.option("--on-pressure", type=click.Choice(["yield", "hold"]), default=None)
@click.option("--max-hold", default=None, metavar="DURATION|off",
              help="the keeper releases everything and exits DURATION from now; off: never")
@json_option
@click.pass_obj
def set_(obj: Ctx, /, gpus: str | None, as_json: bool, max_hold: str | None,
         **changes: Any) -> int:
    """Change settings of running workers without restarting them (kept for their restarts).
    Naming a stopped or fatal GPU fails (exit 1); --vram is refused above the GPU's memory and,
    as a size, while its first start has not reported that yet. --max-hold is the whole
    keeper's (not with --gpus)."""
    obj.as_json = as_json
    args = _args(**changes)
    if max_hold is not None:
        if gpus is not None:
            raise click.UsageError("--max-hold is for the whole keeper: do not give --gpus")
        try:
            off = max_hold.strip().lower() in ("off", "none")
            args["max_hold"] = None if off else parse_duration(max_hold, MAX_SECONDS)
        except UnitError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-hold") from None
    if "vram" in args:
        try:
            parse_vram(args["vram"])
        except UnitError as exc:
            raise click.BadParameter(str(exc), param_hint="--vram") from None
    if not args:
        raise click.UsageError("give at least one setting to change")
    result = obj.call("set", {**_args(gpus=_gpus(gpus)), **args})
    text = _applied("updated", result)
    if "max_hold" in args:
        left = result.get("hold_left_s")
        text = "\n".join(filter(None, [text, "max hold: none" if left is None
                                        else f"max hold: releases in {left:g}s"]))
    obj.show(result, text)
    return 0


# Runs as CMD's pid before CMD: waits for "g" on fd argv[1] (the yield is acknowledged and the
# memory free), then execs CMD. EOF instead (keepgpu-ctl failed or died): CMD never runs.
_LAUNCH = """
import os, sys
fd = int(sys.argv[1])
try:
    go = os.read(fd, 1)
except OSError:
    go = b""
if go != b"g":
    os._exit(1)
os.close(fd)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write(f"keepgpu-ctl: error: {sys.argv[2]}: {exc.strerror}\\n")
    os._exit(127 if isinstance(exc, (FileNotFoundError, NotADirectoryError)) else 126)
"""


@cli.command(name="yield", context_settings={"allow_interspersed_args": False})
@gpus_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED,
                metavar="-- CMD [ARGS]...")
@click.pass_obj
def yield_(obj: Ctx, gpus: str | None, command: tuple[str, ...]) -> int:
    """Free the GPUs (all, or --gpus) for CMD: the keeper stops their workers, CMD starts once
    their memory is free, and the keeper holds them again when CMD ends (it watches CMD's pid
    itself: a killed CMD or keepgpu-ctl changes nothing). Exits with CMD's exit code; 3 and
    CMD not run when no keeper answers."""
    refs = _gpus(gpus)
    if shutil.which(command[0]) is None:
        fail(EXIT_NOT_FOUND, f"{command[0]}: command not found")
    try:
        bound = obj.client.yield_bound()
    except NoSupervisor as exc:
        fail(EXIT_NO_SUPERVISOR, f"no supervisor answering: {exc}; {command[0]} not run")
    except BadEndpoint as exc:
        fail(EXIT_USAGE, str(exc))
    except CommandFailed as exc:
        fail(EXIT_FAILED, exc.message)
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCH, str(read_fd), *command],
                             pass_fds=(read_fd,))
    os.close(read_fd)
    go = False
    try:
        result = obj.call("yield", _args(gpus=refs, pid=child.pid), wait=bound)
        stuck = [str(g["gpu"]) for g in result.get("gpus", []) if g.get("outcome") == "unkillable"]
        if stuck:
            fail(EXIT_FAILED, f"GPU(s) {','.join(stuck)}: worker unkillable, memory may still be "
                 f"held; {command[0]} not run")
        os.write(write_fd, b"g")
        go = True
    finally:
        os.close(write_fd)  # without "g": the launcher exits, and the keeper holds again
        if not go:
            child.wait(10)
    return _wait_forwarding(child)


def _wait_forwarding(child: subprocess.Popen[bytes]) -> int:
    """CMD's exit code; SIGINT/SIGTERM/SIGHUP to keepgpu-ctl meanwhile are passed on to CMD."""
    def forward(signum: int, frame: object) -> None:
        if not terminal_sent(signum) and child.returncode is None:
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    return exit_code(child.wait())


@cli.command()
@click.option("--ready", is_flag=True, required=True, help="wait until every GPU holds")
@click.option("--timeout", "--wait-timeout", "wait_timeout", type=FiniteRange(0, 86400),
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
        except BadEndpoint as exc:
            fail(EXIT_USAGE, str(exc))
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


cli.add_command(explain)
cli.add_command(top)
cli.add_command(gpus_command)
cli.add_command(metrics_command)


def main() -> None:
    run_standalone(cli, "keepgpu-ctl")


if __name__ == "__main__":  # pragma: no cover
    main()
