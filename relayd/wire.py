"""The records that cross a process boundary: the listener↔delivery pipe and status.json.

Pipe: one JSON object per line. Listener -> delivery process (its stdin): first Start, then
any of Queued, Flush, Rescan, Reconfigure; end of input means stop. Delivery process ->
listener (its stdout): Alive until Ready, then Report, each every few seconds; Failed as its
last line when it cannot run. status.json is
DaemonStatus, written by app.Daemon and read by `relayd health`. The JSON of each record is
exactly what went over the pipe or into the file before these classes existed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from relayd import config as config_mod
from relayd.config import Config

STATUS_FILE = "status.json"  # in the spool root; written by app.Daemon, read by `relayd health`


def encode(record: Any) -> bytes:
    """One pipe line for a record."""
    return json.dumps(record.to_json()).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class DeliveryStatus:
    """What the delivery loop reports about itself (health, metrics, STATUS=, status.json)."""

    queued: int = 0
    in_flight: int = 0
    oldest_age: float = 0.0
    consecutive_failures: int = 0
    last_error: dict[str, Any] | None = None
    last_delivery_at: float | None = None
    # Per upstream, in config order: its breaker's snapshot (breaker.BreakerSnapshot) with its
    # pacing (provider.Provider.snapshot): state, paused_until, reason, why a due message
    # waits, today's count, the rate in force.
    upstreams: tuple[dict[str, Any], ...] = ()
    # The spool refuses to record an outcome: {"errno", "text", "since", "held"}, else None.
    spool_error: dict[str, Any] | None = None

    @property
    def upstream(self) -> dict[str, Any] | None:
        """The first upstream's entry (the only one of a single upstream: config)."""
        return self.upstreams[0] if self.upstreams else None

    def to_json(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "in_flight": self.in_flight,
            "oldest_age": self.oldest_age,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "last_delivery_at": self.last_delivery_at,
            "upstreams": list(self.upstreams),
            "upstream": self.upstream,  # the first, as before several upstreams
            "spool_error": self.spool_error,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DeliveryStatus:
        return cls(
            queued=int(doc.get("queued") or 0),
            in_flight=int(doc.get("in_flight") or 0),
            oldest_age=float(doc.get("oldest_age") or 0.0),
            consecutive_failures=int(doc.get("consecutive_failures") or 0),
            last_error=_dict_or_none(doc.get("last_error")),
            last_delivery_at=_float_or_none(doc.get("last_delivery_at")),
            upstreams=tuple(u for u in doc.get("upstreams") or () if isinstance(u, dict)),
            spool_error=_dict_or_none(doc.get("spool_error")),
        )


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """<spool>/status.json: the daemon's pid, liveness and its delivery status."""

    pid: int
    updated_at: float
    ready: bool
    failed: int
    delivery: DeliveryStatus = field(default_factory=DeliveryStatus)
    # Why no delivery process has been ready for relay.hang_timeout; "" while one is.
    delivery_down: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"pid": self.pid, "updated_at": self.updated_at, "ready": self.ready}
        doc["failed"] = self.failed
        if self.delivery_down:
            doc["delivery_down"] = self.delivery_down
        rest = self.delivery.to_json()
        del rest["in_flight"]
        return {**doc, **rest}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DaemonStatus:
        """Tolerant: a missing or empty field reads as its zero value."""
        pid = doc.get("pid")
        return cls(
            pid=pid if isinstance(pid, int) else 0,
            updated_at=float(doc.get("updated_at") or 0.0),
            ready=bool(doc.get("ready")),
            failed=int(doc.get("failed") or 0),
            delivery=DeliveryStatus.from_json(doc),
            delivery_down=str(doc.get("delivery_down") or ""),
        )


def _float_or_none(value: Any) -> float | None:
    return float(value) if value else None


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


# -- listener -> delivery process ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """The first line: the whole config (secrets included) and whether this is --dev."""

    config: Config = field(repr=False)
    dev: bool

    def to_json(self) -> dict[str, Any]:
        return {"config": config_mod.to_json(self.config), "dev": self.dev}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Start:
        return cls(config_mod.from_json(doc["config"]), bool(doc["dev"]))


@dataclass(frozen=True, slots=True)
class Queued:
    """A message the listener just spooled."""

    id: str
    due: float
    created: float
    sender: str | None = None  # lets the delivery process guess the route before loading
    rcpts: int = 1  # pending recipients, for a daily quota counted per recipient

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"new": self.id, "due": self.due, "created": self.created}
        if self.sender is not None:
            doc["sender"] = self.sender
        doc["rcpts"] = self.rcpts
        return doc


@dataclass(frozen=True, slots=True)
class Flush:
    """Everything queued is due now (SIGUSR1)."""

    def to_json(self) -> dict[str, Any]:
        return {"cmd": "flush"}


@dataclass(frozen=True, slots=True)
class Rescan:
    """Re-read queue/ (SIGUSR2, after a CLI edit)."""

    def to_json(self) -> dict[str, Any]:
        return {"cmd": "rescan"}


@dataclass(frozen=True, slots=True)
class Reconfigure:
    """A reloaded config (SIGHUP)."""

    config: Config = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"cmd": "config", "config": config_mod.to_json(self.config)}


Command = Queued | Flush | Rescan | Reconfigure


def command_from_json(doc: dict[str, Any]) -> Command | None:
    """The command a pipe line carries; None for one this version does not know."""
    if "new" in doc:
        sender = doc.get("sender")
        return Queued(
            str(doc["new"]),
            float(doc["due"]),
            float(doc["created"]),
            sender if isinstance(sender, str) else None,
            int(doc.get("rcpts") or 1),
        )
    cmd = doc.get("cmd")
    if cmd == "flush":
        return Flush()
    if cmd == "rescan":
        return Rescan()
    if cmd == "config":
        return Reconfigure(config_mod.from_json(doc["config"]))
    return None


# -- delivery process -> listener ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alive:
    """A heartbeat while the delivery process starts (lock wait, queue scan)."""

    def to_json(self) -> dict[str, Any]:
        return {"alive": True}


@dataclass(frozen=True, slots=True)
class Ready:
    """The queue is scanned: depth messages are indexed."""

    depth: int

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.depth}


@dataclass(frozen=True, slots=True)
class Report:
    """The periodic report: delivery status and the metric events counted since the last."""

    status: DeliveryStatus
    metrics: tuple[Any, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status.to_json(), "metrics": list(self.metrics)}


@dataclass(frozen=True, slots=True)
class Failed:
    """The delivery process cannot run (its last line before it exits non-zero): why."""

    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"failed": self.reason}


def report_from_json(doc: dict[str, Any]) -> Alive | Ready | Report | Failed | None:
    """What a line from the delivery process says; None for one this version does not know.

    Raises TypeError/ValueError for a line whose fields have the wrong types.
    """
    if "failed" in doc:
        return Failed(str(doc["failed"]))
    if "ready" in doc:
        return Ready(int(doc["ready"]))
    if "status" in doc:
        return Report(DeliveryStatus.from_json(doc["status"]), tuple(doc.get("metrics", ())))
    if "alive" in doc:
        return Alive()
    return None
