"""`keepgpu-exporter [--listen 127.0.0.1:9464]`: serve the metrics of every keeper of this user
(run as root: of every user on the node, with a `user` label) over HTTP at /metrics.

Its own process, never a thread inside a supervisor: each scrape asks every keeper for
`status` over its control socket (keepgpu.cli.metrics), so a keeper does no work for
monitoring between scrapes. Exit codes: 0 after SIGTERM/SIGINT; 2 bad usage; 78 cannot listen
there (port in use, not allowed, unknown host).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

import click
from prometheus_client import CONTENT_TYPE_LATEST

from keepgpu._version import __version__
from keepgpu.cli.common import EXIT_CONFIG, fail, run_standalone, setup_logging
from keepgpu.cli.metrics import KeeperCollector, exposition

log = logging.getLogger("keepgpu.exporter")
DEFAULT_LISTEN = "127.0.0.1:9464"  # 9464: the port OpenTelemetry's Prometheus exporter uses
_INDEX = b'<html><body><a href="/metrics">keepgpu metrics</a></body></html>\n'


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` (every interface) -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{text!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN})",
                                 param_hint="--listen")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper never holds up our exit
    collector: KeeperCollector


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype, code = exposition(self.server.collector), CONTENT_TYPE_LATEST, 200
        elif path == "/":
            body, ctype, code = _INDEX, "text/html; charset=utf-8", 200
        else:
            body, ctype, code = b"not found\n", "text/plain; charset=utf-8", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        log.debug("%s %s", self.address_string(), format % args)


def _bind(host: str, port: int) -> _Server:
    """The HTTP server bound to host:port; a bind failure is one line and exit 78."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    cls = type("_BoundServer", (_Server,), {"address_family": family})
    try:
        return cls((host, port), _Handler)  # type: ignore[no-any-return]
    except OSError as exc:
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        why = {errno.EADDRINUSE: "address already in use",
               errno.EACCES: "permission denied (ports below 1024 need root)",
               errno.EADDRNOTAVAIL: "no such local address"}.get(exc.errno or 0)
        fail(EXIT_CONFIG, f"cannot listen on {where}: {why or exc.strerror or exc}")


@click.command(context_settings={"auto_envvar_prefix": "KEEPGPU",
                                 "show_default": True})
@click.option("--listen", default=DEFAULT_LISTEN, help="HOST:PORT to serve /metrics on")
@click.option("--timeout", type=click.FloatRange(0.01, 60), default=1.0,
              help="seconds each keeper gets to answer a scrape")
@click.option("-v", "--verbose", count=True, help="more log lines (-v: every request)")
@click.version_option(__version__, prog_name="keepgpu-exporter")
def cli(listen: str, timeout: float, verbose: int) -> int:
    """Serve Prometheus metrics of this user's keepers (as root: every user's)."""
    setup_logging(verbose, "text", sys.stderr)
    host, port = parse_listen(listen)
    server = _bind(host, port)
    server.collector = KeeperCollector(timeout=timeout)
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    who = "every user" if os.geteuid() == 0 else f"uid {os.getuid()}"
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("serving http://%s:%d/metrics for the keepers of %s", shown, bound_port, who)
    # SIGTERM/SIGINT only set a flag: raising from the handler could land in the middle of a
    # request thread's start-up and leave the server half torn down.
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    server.timeout = 0.5  # handle_request() returns at least this often to look at the flag
    try:
        while not stopping:
            server.handle_request()
        log.info("stopping")
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        server.server_close()
        server.collector.close()
    return 0


def main() -> None:
    run_standalone(cli, "keepgpu-exporter")


if __name__ == "__main__":  # pragma: no cover
    main()
