"""Prometheus metrics (prometheus-client) and the optional /metrics, /healthz, /readyz endpoint."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from relayd.errors import RelaydError

ACCEPTED = Counter("relayd_messages_accepted", "Messages accepted and spooled (250 sent).")
DELIVERED = Counter("relayd_messages_delivered", "Recipients the upstream accepted with 250.")
DEFERRED = Counter("relayd_messages_deferred", "Delivery attempts that ended in a retry.")
FAILED = Counter(
    "relayd_messages_failed", "Recipients refused permanently or expired.", ["reply_class"]
)
REJECTED = Counter("relayd_messages_rejected", "Submissions answered 4xx/5xx.", ["reason"])
UPSTREAM_FAILURES = Counter(
    "relayd_upstream_failures", "Upstream sessions that failed, by step.", ["step"]
)
DELIVERY_SECONDS = Histogram(
    "relayd_delivery_duration_seconds",
    "Time from the start of an attempt to the upstream's answer.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_DEPTH = Gauge("relayd_queue_depth", "Messages in the spool by state.", ["state"])
OLDEST_AGE = Gauge("relayd_queue_oldest_age_seconds", "Age of the oldest queued message.")

# The delivery process counts these; the listener process, which serves /metrics, applies them.
FORWARDED = ("DELIVERED", "DEFERRED", "FAILED", "UPSTREAM_FAILURES", "DELIVERY_SECONDS")


class _Recorder:
    """Stands in for a Counter or Histogram in the delivery process: records, never exports."""

    def __init__(self, name: str, events: list[Any], labels: dict[str, str] | None = None):
        self.name, self.events, self.label_values = name, events, labels or {}

    def labels(self, **values: str) -> _Recorder:
        return _Recorder(self.name, self.events, values)

    def inc(self, amount: float = 1.0) -> None:
        self.events.append((self.name, self.label_values, "inc", amount))

    def observe(self, value: float) -> None:
        self.events.append((self.name, self.label_values, "observe", value))


def forward(events: list[Any]) -> None:
    """In the delivery process: record the forwarded metrics into events instead."""
    for name in FORWARDED:
        globals()[name] = _Recorder(name, events)


def apply(events: Any) -> None:
    """In the listener process: replay events recorded by the delivery process."""
    for name, labels, op, value in events:
        if name not in FORWARDED or op not in ("inc", "observe"):
            continue
        metric = globals()[name]
        if labels:
            metric = metric.labels(**labels)
        getattr(metric, op)(float(value))


# Series that exist from the start, so a dashboard sees 0 rather than no data.
for _state in ("queue", "failed"):
    QUEUE_DEPTH.labels(state=_state)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

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

    /healthz answers 200 while the daemon's event loop is alive (alive()), /readyz while it
    accepts mail (ready()); /metrics calls refresh() first so the gauges are current.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        alive: Callable[[], bool],
        refresh: Callable[[], None],
    ) -> None:
        endpoint = self

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.ready, self.alive, self.refresh = ready, alive, refresh
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
        path = req.path.split("?", 1)[0]
        if path == "/metrics":
            self.refresh()
            body, ctype, status = generate_latest(REGISTRY), CONTENT_TYPE_LATEST, 200
        elif path in ("/healthz", "/readyz"):
            ok = self.alive() if path == "/healthz" else self.ready()
            word = "ok" if path == "/healthz" else "ready"
            body = f"{word}\n".encode() if ok else f"not {word}\n".encode()
            ctype, status = "text/plain; charset=utf-8", 200 if ok else 503
        else:
            body, ctype, status = b"not found\n", "text/plain; charset=utf-8", 404
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
