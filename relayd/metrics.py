"""Prometheus counters and gauges (prometheus-client), and their forwarding between processes.

The delivery process records the FORWARDED ones and reports them; the listener, which serves
them (relayd.endpoint), applies them.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from relayd.states import SpoolDir

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
for _state in (SpoolDir.QUEUE, SpoolDir.FAILED):
    QUEUE_DEPTH.labels(state=_state)
