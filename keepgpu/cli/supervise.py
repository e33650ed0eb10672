"""`keepgpu-supervise`: start the supervisor (one worker process per selected GPU).

Exit codes: 0 released cleanly; 1 some GPU not released cleanly / already running; 2 usage;
4 every GPU fatal; 78 configuration error (no such GPU, unusable runtime dir or endpoint).
With `-- CMD`: CMD's exit code (128+N after signal N, 127 not found, 126 not executable);
128+N when signal N ended the keeper before CMD started.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import zmq

from keepgpu._version import __version__
from keepgpu.cli.common import (
    EXIT_CONFIG,
    Exit,
    FiniteRange,
    bad_option,
    fail,
    run_standalone,
    setup_logging,
)
from keepgpu.cli.detach import Reporter, daemonize, open_log_file, wait_for_daemon
from keepgpu.protocol import defaults as d
from keepgpu.protocol import faults, keys
from keepgpu.protocol.control import MAX_SECONDS, MODES
from keepgpu.protocol.endpoint import EndpointError
from keepgpu.protocol.endpoint import parse as parse_endpoint
from keepgpu.protocol.runtime import (
    Paths,
    RuntimeDirError,
    default_runtime_dir,
    ensure_dir,
    paths_for,
)
from keepgpu.protocol.units import UnitError, parse_duration, parse_size, parse_vram
from keepgpu.supervisor import watch
from keepgpu.supervisor.command import Command
from keepgpu.supervisor.config import ENGINES, SupervisorConfig, WorkerSettings
from keepgpu.supervisor.devices import ConfigError, Device, Visible, select, visible_devices
from keepgpu.supervisor.lock import AlreadyRunning, InstanceLock
from keepgpu.supervisor.loop import Supervisor
from keepgpu.telemetry.fake import parse_scenario

log = logging.getLogger("keepgpu.supervisor")
_F = TypeVar("_F", bound=Callable[..., Any])


def _positive(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise click.BadParameter(f"must be a positive number of seconds, not {value:g}")
    return value


def _seconds(flag: str, default: float, help: str = "seconds") -> Callable[[_F], _F]:
    """A positive, finite duration option of at most 30 days (deadlines must stay
    representable: inf or 1e300 would overflow poll() and select())."""
    return click.option(flag, type=FiniteRange(max=MAX_SECONDS), default=default,
                        callback=_positive, help=help)


def _pct(lo: float) -> click.FloatRange:
    return FiniteRange(lo, 100.0)


def check_control(endpoint: str) -> str:
    """Allow ipc://PATH, ipc://@NAME and tcp://HOST:PORT|* (any host: tcp always serves CURVE,
    with the user's keys, which must be usable now). Raises ConfigError (exit 78)."""
    try:
        ep = parse_endpoint(endpoint)
        if ep.kind == "tcp":
            keys.own_keypair()
    except EndpointError as exc:
        raise ConfigError(f"--control {exc}") from None
    except keys.KeyFileError as exc:
        raise ConfigError(f"--control {endpoint}: CURVE keys: {exc}") from None
    return endpoint


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value, MAX_SECONDS)
    except UnitError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(context_settings={"auto_envvar_prefix": "KEEPGPU", "show_default": True,
                                 "allow_interspersed_args": False})
@click.option("--gpus", default="all", help="all, ordinals (0,1) or GPU UUIDs, comma separated")
@click.option("--vram", default=d.VRAM, help="VRAM to hold per GPU: 1GiB, 750MB, 20%, bytes")
@click.option("--mode", type=click.Choice(MODES), default=d.MODE, help="activity kind")
@click.option("--target-util", type=_pct(1), default=d.TARGET_UTIL,
              help="utilization target, percent")
@click.option("--busy-threshold", type=_pct(-1), default=d.BUSY_THRESHOLD,
              help="back off when other processes use more than this percent; -1 never")
@click.option("--max-temp", type=FiniteRange(1, 150), default=d.MAX_TEMP,
              help="pause above, °C")
@click.option("--on-pressure", type=click.Choice(["yield", "hold"]), default=d.ON_PRESSURE)
@_seconds("--heartbeat", d.HEARTBEAT_S)
@_seconds("--hang-timeout", d.HANG_TIMEOUT_S)
@_seconds("--start-timeout", d.START_TIMEOUT_S)
@_seconds("--join-timeout", d.JOIN_TIMEOUT_S)
@_seconds("--kill-timeout", d.KILL_TIMEOUT_S)
@click.option("--max-restarts", type=click.IntRange(0), default=d.MAX_RESTARTS)
@_seconds("--restart-window", d.RESTART_WINDOW_S)
@_seconds("--restart-delay", d.RESTART_DELAY_S, "first restart delay, doubling up to 60 s")
@click.option("--name", default="default", help="supervisor name (socket and lock names)")
@click.option("--control", default=None,
              help="explicit endpoint: ipc://PATH, ipc://@NAME, tcp://HOST:PORT|* (CURVE)")
@click.option("--engine", type=click.Choice(ENGINES), default="auto")
@click.option("--detach", is_flag=True, help="run in the background; return once GPUs hold")
@click.option("--exit-with", type=click.IntRange(1), default=None, metavar="PID",
              help="release everything and exit when process PID ends")
@click.option("--max-hold", default=None, callback=_duration, metavar="DURATION",
              help="release everything and exit after DURATION (90m, 8h, seconds)")
@click.option("--no-wait", is_flag=True, help="with -- CMD: start CMD at once, not once GPUs hold")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("-v", "--verbose", count=True)
@click.option("-q", "--quiet", count=True)
@click.version_option(__version__, prog_name="keepgpu-supervise")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMD [ARGS]...]")
def cli(**opts: Any) -> int:
    """Hold GPUs with one isolated worker process per GPU, until stopped; with `-- CMD`, while
    CMD runs (it starts once every GPU holds), exiting with CMD's exit code."""
    if opts["command"] and opts["detach"]:
        bad_option("detach", "--detach cannot be combined with -- CMD (whose exit code is ours)")
    if opts["no_wait"] and not opts["command"]:
        bad_option("no_wait", "--no-wait needs -- CMD")
    if opts["heartbeat"] * 2 > opts["hang_timeout"]:
        bad_option("hang_timeout", "--hang-timeout must be at least twice --heartbeat")
    try:
        vram = parse_vram(opts["vram"])
    except UnitError as exc:
        bad_option("vram", str(exc))
    worker = WorkerSettings(
        engine=opts["engine"],
        vram=vram,
        mode=opts["mode"],
        target_util=opts["target_util"],
        busy_threshold=opts["busy_threshold"],
        max_temp=opts["max_temp"],
        on_pressure=opts["on_pressure"],
        heartbeat_s=opts["heartbeat"],
    )
    config = SupervisorConfig(
        name=opts["name"],
        gpus=opts["gpus"],
        control=opts["control"],
        worker=worker,
        hang_timeout_s=opts["hang_timeout"],
        start_timeout_s=opts["start_timeout"],
        join_timeout_s=opts["join_timeout"],
        kill_timeout_s=opts["kill_timeout"],
        max_restarts=opts["max_restarts"],
        restart_window_s=opts["restart_window"],
        restart_delay_s=opts["restart_delay"],
        restart_delay_max_s=max(d.RESTART_DELAY_MAX_S, opts["restart_delay"]),
        max_hold_s=opts["max_hold"],
    )
    logging_opts = (opts["verbose"] - opts["quiet"], opts["log_format"], opts["log_file"])
    return serve(config, opts["detach"], *logging_opts, exit_with=opts["exit_with"],
                 command=list(opts["command"]) or None, wait=not opts["no_wait"])


def _open_log(path: Path | None) -> tuple[Any, int | None]:
    """(log stream, a copy of the original stderr for `-- CMD`, or None when unchanged)."""
    if path is None:
        return sys.stderr, None
    _, fd = open_log_file(path)
    fh = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
    # CMD writes where the user's terminal or job output is, not into our log.
    saved = os.dup(2)
    # Workers inherit fd 2: their stack dumps and errors land in the same file.
    os.dup2(fh.fileno(), 2)
    return fh, saved


def _prepare(config: SupervisorConfig) -> tuple[Paths, list[Device], Visible]:
    """Everything that can be wrong with the configuration, found before anything starts."""
    try:
        paths = paths_for(config.name, ensure_dir(default_runtime_dir()))
        if config.control:
            config.control = check_control(config.control)
        _ = paths.control_endpoint, paths.workers_endpoint  # path length checks
        _check_engine(config.worker.engine)  # before device discovery: its advice needs torch
        visible = visible_devices(config.worker.engine)
        devices = select(config.gpus, visible)
    except (RuntimeDirError, ConfigError) as exc:
        fail(EXIT_CONFIG, str(exc))
    config.worker.engine = visible.engine
    return paths, devices, visible


def _check_engine(engine: str) -> None:
    """What every worker would die of at start, found once here (ConfigError, exit 78):
    torch missing for a torch engine, or a malformed KEEPGPU_FAKE_* for the fake one."""
    if engine != "fake":
        # find_spec looks torch up without importing it (the supervisor never loads torch).
        if importlib.util.find_spec("torch") is None:
            raise ConfigError(
                f"--engine {engine} needs torch, which is not installed for {sys.executable}: "
                "install a build for your GPU (pip install torch, see pytorch.org), "
                "or use --engine fake"
            )
        return
    try:
        faults.check_env()
        parse_size(os.environ.get("KEEPGPU_FAKE_MEM_TOTAL", "80GiB"))
    except faults.FaultError as exc:
        raise ConfigError(str(exc)) from None
    except UnitError as exc:
        raise ConfigError(f"KEEPGPU_FAKE_MEM_TOTAL: {exc}") from None
    try:
        parse_scenario(os.environ.get("KEEPGPU_FAKE_TELEMETRY", "idle"))
    except ValueError as exc:
        raise ConfigError(f"KEEPGPU_FAKE_TELEMETRY: {exc}") from None


def serve(
    config: SupervisorConfig,
    detach: bool = False,
    verbosity: int = 0,
    log_format: str = "text",
    log_file: Path | None = None,
    exit_with: int | None = None,
    command: list[str] | None = None,
    wait: bool = True,
) -> int:
    paths, devices, visible = _prepare(config)
    if exit_with is not None and not watch.exists(exit_with):
        fail(EXIT_CONFIG, f"--exit-with {exit_with}: no such process")
    if detach:
        # Opened (and made absolute) before forking: a bad path is exit 78 with nothing
        # started, and a relative one is not re-resolved after the daemon's chdir("/").
        log_path, log_fd = open_log_file(log_file or paths.logfile)
        read_fd = daemonize(log_fd)
        if read_fd is not None:  # the starting shell
            wait_s = config.start_timeout_s + config.join_timeout_s + config.kill_timeout_s + 10
            code, line = wait_for_daemon(read_fd, wait_s, log_path)
            click.echo(line)
            return code
        stream: Any = sys.stderr
        cmd_stderr = None
    else:
        stream, cmd_stderr = _open_log(log_file)
    setup_logging(verbosity, log_format, stream)
    cmd = None
    if command:
        env = dict(os.environ)
        # CMD (and keepgpu-ctl inside it, e.g. `keepgpu-ctl yield`) finds this keeper.
        env.pop("KEEPGPU_CONTROL", None)
        env["KEEPGPU_NAME"] = config.name
        cmd = Command(command, env, cmd_stderr)
    try:
        return _run(config, paths, devices, visible, exit_with, cmd, wait)
    except Exit as exc:
        Reporter.report({"error": exc.message, "code": exc.code})
        raise


def _run(
    config: SupervisorConfig, paths: Paths, devices: list[Device], visible: Visible,
    exit_with: int | None = None, command: Command | None = None, wait: bool = True,
) -> int:
    lock = InstanceLock(paths, config.control)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        fail(1, str(exc))
    except OSError as exc:
        fail(EXIT_CONFIG, f"cannot take the lock {exc.filename or paths.lock}: {exc.strerror}")
    try:
        sup = Supervisor(config, devices, visible.vendor, paths)
        try:
            sup.bind()
        except keys.KeyFileError as exc:
            fail(EXIT_CONFIG, f"--control {sup.endpoint}: CURVE keys: {exc}")
        except zmq.ZMQError as exc:
            # EADDRINUSE: a tcp port or abstract name held by a process that is not a keepgpu
            # supervisor of ours (those are refused by the endpoint lock, with their pid).
            code = 1 if exc.errno == errno.EADDRINUSE else EXIT_CONFIG
            fail(code, f"cannot bind {sup.endpoint}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one line, not a traceback
            fail(EXIT_CONFIG, f"cannot bind {sup.endpoint}: {exc}")
        lock.publish(sup.endpoint)
        sup.install_signals()
        if exit_with is not None:
            sup.watch_pid(exit_with)
        sup.on_ready = _report_ready
        sup.on_progress = Reporter.progress
        sup.command, sup.command_wait = command, wait
        if command is not None and config.control:
            command.env["KEEPGPU_CONTROL"] = sup.endpoint  # the port a tcp://HOST:* got
        log.info(
            "keepgpu %s supervisor %r pid %d: %d GPU(s) [%s], engine %s, control %s",
            __version__, config.name, os.getpid(), len(devices),
            ",".join(d.entry for d in devices), visible.engine, sup.endpoint,
        )
        code = sup.run()
        Reporter.report({"error": f"the supervisor ended during start (exit {code})", "code": code})
        return code
    finally:
        lock.release()


def _report_ready(sup: Supervisor) -> None:
    states = [s.state for s in sup.slots.values()]
    Reporter.report({"name": sup.name, "pid": sup.pid, "endpoint": sup.endpoint, "states": states})


def main() -> None:
    run_standalone(cli, "keepgpu-supervise")


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["main", "serve"]
