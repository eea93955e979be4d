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
HELD = Counter(
    "relayd_messages_held",
    "Messages kept queued, no attempt counted, because the upstream paused or throttled.",
    ["action"],
)
THROTTLED = Counter("relayd_upstream_throttled", "Replies that slowed an upstream down.")
REAUTH = Counter("relayd_upstream_reauth", "Replies that refused the upstream's credentials.")
PACING_WAIT = Histogram(
    "relayd_pacing_wait_seconds",
    "How long a due message waited for its upstream's rate, quota or pause.",
    buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
)
UPSTREAM_PAUSED = Gauge(
    "relayd_upstream_paused", "1 while the upstream is paused over a quota.", ["upstream"]
)
UPSTREAM_REAUTH_NEEDED = Gauge(
    "relayd_upstream_reauth_needed",
    "1 while the upstream refuses relayd's credentials.",
    ["upstream"],
)
SENT_TODAY = Gauge(
    "relayd_upstream_sent_today",
    "What the upstream's daily quota has counted today (messages or recipients).",
    ["upstream"],
)
PACING_FALLBACK = Gauge(
    "relayd_pacing_fallback", "1 while Redis is unreachable and the local share is in force."
)
QUEUE_DEPTH = Gauge("relayd_queue_depth", "Messages in the spool by state.", ["state"])
OLDEST_AGE = Gauge("relayd_queue_oldest_age_seconds", "Age of the oldest queued message.")
UPSTREAM_STATE = Gauge(
    "relayd_upstream_state",
    "1 for the state each upstream's circuit breaker is in (ok, open, half_open, paused, "
    "throttled, reauth), 0 for the others.",
    ["upstream", "state"],
)

# The delivery process counts these; the listener process, which serves /metrics, applies them.
FORWARDED = (
    "DELIVERED",
    "DEFERRED",
    "FAILED",
    "UPSTREAM_FAILURES",
    "DELIVERY_SECONDS",
    "HELD",
    "THROTTLED",
    "REAUTH",
    "PACING_WAIT",
)


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


def set_upstream(up: dict[str, Any]) -> None:
    """The upstream gauges from a delivery status's "upstream" entry."""
    # label: the single upstream: section's host, as before several upstreams; else the name
    name = str(up.get("label") or up.get("name") or "")
    UPSTREAM_PAUSED.labels(upstream=name).set(1 if up.get("state") == "paused" else 0)
    UPSTREAM_REAUTH_NEEDED.labels(upstream=name).set(1 if up.get("reauth") else 0)
    SENT_TODAY.labels(upstream=name).set(float(up.get("sent_today") or 0))
    PACING_FALLBACK.set(1 if up.get("backend") == "fallback" else 0)


# Series that exist from the start, so a dashboard sees 0 rather than no data.
for _state in (SpoolDir.QUEUE, SpoolDir.FAILED):
    QUEUE_DEPTH.labels(state=_state)
