"""Log record formats shared by the supervisor and its workers (`--log-format text|json`).

A log call carries its facts as structured fields: `log.info("...", extra=fields(...))`. The
text format prints the message (written for people: human units, each fact once); the json
format prints one object per line with `ts`, `level`, `logger`, `pid` (the process that wrote
the line), `msg`, and every field given (`event`, `gpu`, `incarnation`, `worker_pid`, `state`,
`reason`, telemetry readings...). Nothing here configures a handler (see keepgpu.cli.common and
keepgpu.worker.run); importing it has no side effects.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

#: Environment variables through which the supervisor tells its workers how to log: workers
#: write to the supervisor's stderr, so every line of both must have the same format.
WORKER_FORMAT_ENV = "KEEPGPU_WORKER_LOG_FORMAT"
WORKER_LEVEL_ENV = "KEEPGPU_WORKER_LOG_LEVEL"
FORMATS = ("text", "json")

_KEY = "keepgpu_fields"


def fields(event: str, **values: Any) -> dict[str, Any]:
    """The `extra=` of a log call: `event` names what happened (for machines), `values` are
    its facts. None values are kept: in json, unknown is null."""
    return {_KEY: {"event": event, **values}}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record ({} for a plain log call)."""
    found = getattr(record, _KEY, None)
    return dict(found) if isinstance(found, dict) else {}


def _timestamp(record: logging.LogRecord) -> str:
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback goes into `exc`).

    `static` fields go into every record of this process (a worker's gpu and incarnation).
    """

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            **self.static,
        }
        extra = record_fields(record)
        out["event"] = extra.pop("event", "log")
        out["msg"] = record.getMessage()
        for key, value in extra.items():
            out.setdefault(key, value)  # the fixed keys above are never overwritten
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["exc"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def formatter(fmt: str, text_prefix: str, static: dict[str, Any] | None = None
              ) -> logging.Formatter:
    """The formatter for `--log-format fmt`; `text_prefix` names the process in text lines
    (e.g. `keepgpu.supervisor[%(process)d]`)."""
    if fmt == "json":
        return JsonFormatter(static)
    return logging.Formatter(f"%(asctime)s {text_prefix} %(levelname)s %(message)s")


def plain_record(message: str, level: int = logging.WARNING, name: str = "keepgpu",
                 **values: Any) -> logging.LogRecord:
    """A record made outside a log call (the log sink's own notes), formatted like any other."""
    record = logging.LogRecord(name, level, __file__, 0, message, None, None)
    setattr(record, _KEY, {"event": "log", **values})
    return record
