"""Shared bits of the click front ends: one-line errors, exit codes, logging setup."""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from keepgpu.logfmt import WORKER_FORMAT_ENV, WORKER_LEVEL_ENV, formatter
from keepgpu.logsink import handler_for

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_SUPERVISOR = 3
EXIT_ALL_FATAL = 4
EXIT_CONFIG = 78


class Exit(Exception):
    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def fail(code: int, message: str) -> NoReturn:
    """End the command with one line on stderr and `code`."""
    raise Exit(code, message)


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf (FloatRange lets nan through: every
    comparison with nan is false)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class _EnvTrackingOption(click.Option):
    """Records which environment variable gave an option its value, so that an error caused
    by a variable can name it (click sets the parameter source only after a value converts)."""

    def consume_value(self, ctx: click.Context, opts: Any) -> Any:
        value, source = super().consume_value(ctx, opts)
        if source == ParameterSource.ENVIRONMENT and self.name:
            ctx.meta.setdefault("keepgpu.envvars", {})[self.name] = _envvar_name(ctx, self)
        return value, source


def _envvar_name(ctx: click.Context, param: click.Option) -> str:
    names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
    if ctx.auto_envvar_prefix and param.name:
        names.append(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
    return next((n for n in names if os.environ.get(n)), names[0] if names else "?")


def _track_env(cmd: click.Command) -> None:
    for param in cmd.params:
        if type(param) is click.Option:
            param.__class__ = _EnvTrackingOption
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            _track_env(sub)


def from_env(ctx: click.Context, name: str) -> str | None:
    """The environment variable that set option `name`, or None when it came from elsewhere."""
    found: dict[str, str] = ctx.meta.get("keepgpu.envvars", {})
    return found.get(name)


def bad_option(name: str, message: str) -> NoReturn:
    """A usage error (exit 2) about option `name` of the running command, naming the
    environment variable when the value came from one."""
    ctx = click.get_current_context()
    param = next((p for p in ctx.command.params if p.name == name), None)
    raise click.BadParameter(message, ctx=ctx, param=param)


def _usage_line(exc: click.UsageError) -> str:
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        cmds = ", ".join(getattr(exc.ctx.command, "commands", {})) if exc.ctx else ""
        return f"missing command ({cmds})" if cmds else "missing arguments"
    if isinstance(exc, click.BadParameter) and exc.ctx and exc.param and exc.param.name:
        var = from_env(exc.ctx, exc.param.name)
        if var:
            return f"{var}={os.environ.get(var, '')!r}: {exc.format_message()}"
    return exc.format_message()


def run_standalone(cmd: click.Command, prog: str) -> NoReturn:
    """Run a click command; every error becomes one line `prog: error: ...` and an exit code."""
    _track_env(cmd)
    try:
        rv = cmd.main(prog_name=prog, standalone_mode=False)
    except Exit as exc:
        if exc.message:
            click.echo(f"{prog}: error: {exc.message}", err=True)
        sys.exit(exc.code)
    except click.UsageError as exc:
        hint = f" (see {prog} --help)"
        line = " ".join(_usage_line(exc).split())  # one line, whatever click wrapped
        click.echo(f"{prog}: error: {line}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(EXIT_FAILED)
    except click.ClickException as exc:
        click.echo(f"{prog}: error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(rv if isinstance(rv, int) else 0)


def setup_logging(verbosity: int, fmt: str, stream: Any) -> None:
    """Log to `stream` through a handler that drops lines rather than block (keepgpu.logsink):
    a keeper whose stderr is a full pipe must keep serving. The workers this process spawns
    inherit the format and level through the environment (they write to the same stream)."""
    level = max(logging.DEBUG, min(logging.CRITICAL, logging.INFO - 10 * verbosity))
    handler = handler_for(stream)
    handler.setFormatter(formatter(fmt, "%(name)s[%(process)d]"))
    root = logging.getLogger("keepgpu")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Python's warnings would otherwise reach stderr as raw text, breaking a json log.
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = [handler]
    warnings_log.propagate = False
    os.environ[WORKER_FORMAT_ENV] = fmt
    os.environ.setdefault(WORKER_LEVEL_ENV, logging.getLevelName(level))
