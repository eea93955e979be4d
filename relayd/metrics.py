"""Prometheus metrics (prometheus-client) and the optional /metrics, /healthz, /readyz endpoint."""

from __future__ import annotations

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


class Endpoint:
    """A small threaded HTTP server for /metrics, /healthz and /readyz."""

    def __init__(
        self, host: str, port: int, ready: Callable[[], bool], refresh: Callable[[], None]
    ) -> None:
        endpoint = self

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.ready = ready
        self.refresh = refresh
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        if path == "/metrics":
            self.refresh()
            body, ctype, status = generate_latest(REGISTRY), CONTENT_TYPE_LATEST, 200
        elif path == "/healthz":
            body, ctype, status = b"ok\n", "text/plain", 200
        elif path == "/readyz":
            ok = self.ready()
            body, ctype, status = (
                (b"ready\n" if ok else b"not ready\n"),
                "text/plain",
                (200 if ok else 503),
            )
        else:
            body, ctype, status = b"not found\n", "text/plain", 404
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
