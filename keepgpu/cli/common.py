"""Shared bits of the click front ends: one-line errors, exit codes, logging setup."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, NoReturn

import click

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


def run_standalone(cmd: click.Command, prog: str) -> NoReturn:
    """Run a click command; every error becomes one line `prog: error: ...` and an exit code."""
    try:
        rv = cmd.main(prog_name=prog, standalone_mode=False)
    except Exit as exc:
        if exc.message:
            click.echo(f"{prog}: error: {exc.message}", err=True)
        sys.exit(exc.code)
    except click.UsageError as exc:
        hint = f" (see {prog} --help)"
        click.echo(f"{prog}: error: {exc.format_message()}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(EXIT_FAILED)
    except click.ClickException as exc:
        click.echo(f"{prog}: error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(rv if isinstance(rv, int) else 0)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(verbosity: int, fmt: str, stream: Any) -> None:
    """Log to `stream` through a handler that drops lines rather than block (keepgpu.logsink):
    a keeper whose stderr is a full pipe must keep serving."""
    level = logging.INFO - 10 * verbosity
    handler = handler_for(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
        )
    root = logging.getLogger("keepgpu")
    root.handlers[:] = [handler]
    root.setLevel(max(logging.DEBUG, min(logging.CRITICAL, level)))
    root.propagate = False
