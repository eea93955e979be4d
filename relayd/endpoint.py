"""The optional HTTP endpoint of the listener process: /metrics, /healthz and /readyz."""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from relayd.errors import RelaydError
from relayd.logs import Throttle

log = structlog.get_logger()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    errors = Throttle(10.0)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr for each failed request (a scraper gone
        # mid-reply, no thread to be had when out of resources): one log line per 10 s.
        suppressed = self.errors.hit()
        if suppressed is not None:
            log.warning("metrics.request_failed", error=repr(sys.exc_info()[1]), since=suppressed)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves socket.getfqdn(host), which can block on DNS for
        # seconds; the name is never used, so bind without it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Server6(_Server):
    address_family = socket.AF_INET6


class Endpoint:
    """A small threaded HTTP server for /metrics, /healthz and /readyz.

    /healthz answers 200 while the daemon is alive (alive() returns "", else the reason, which
    a 503 carries: a stuck event loop, no delivery process ready), /readyz while it
    accepts mail (ready()); /readyz?upstreams also needs every route to have an upstream usable
    now (unroutable() says which has none). Plain /readyz does not look at upstreams on
    purpose: it is what Kubernetes routes traffic by, and a provider outage is exactly when apps
    must still be able to hand mail to the spool. /metrics calls refresh() first.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        alive: Callable[[], str],
        refresh: Callable[[], None],
        unroutable: Callable[[], str] = lambda: "",
    ) -> None:
        endpoint = self

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.ready, self.alive, self.refresh = ready, alive, refresh
        self.unroutable = unroutable
        try:
            self.httpd = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        except OSError as exc:
            raise RelaydError(
                f"metrics.listen: cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
        self.address: tuple[str, int] = (str(self.httpd.server_address[0]), self.httpd.server_port)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (blocks up to serve_forever's 0.5 s poll)."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        path, _, query = req.path.partition("?")
        if path == "/metrics":
            self.refresh()
            body, ctype, status = generate_latest(REGISTRY), CONTENT_TYPE_LATEST, 200
        elif path == "/healthz":
            problem = self.alive()
            body = f"not ok: {problem}\n".encode() if problem else b"ok\n"
            ctype, status = "text/plain; charset=utf-8", 503 if problem else 200
        elif path == "/readyz":
            ok = self.ready()
            why = self.unroutable() if ok and "upstreams" in query else ""
            body = b"ready\n" if ok and not why else b"not ready\n"
            if why:
                body = f"not ready: {why}\n".encode()
            ctype, status = "text/plain; charset=utf-8", 200 if ok and not why else 503
        else:
            body, ctype, status = b"not found\n", "text/plain; charset=utf-8", 404
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
