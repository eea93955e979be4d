"""structlog set-up: JSON (or console) lines on stderr, with a redaction backstop.

Library loggers (aiosmtpd's ``mail.log``, aiosmtplib, asyncio) are routed through the same
renderer. aiosmtpd logs raw command lines at INFO and AUTH continuation lines at DEBUG, so its
logger is capped at WARNING normally and at INFO even when relayd itself runs at debug.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TextIO

import structlog

from relayd import text
from relayd.states import LogFormat

_SECRETS: set[str] = set()
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def add_secrets(secrets: Iterable[str]) -> None:
    """Register values (and their base64 AUTH forms) that must never appear in a log line."""
    import base64

    for secret in secrets:
        if not secret or len(secret) < 3:
            continue
        _SECRETS.add(secret)
        raw = secret.encode()
        _SECRETS.add(base64.b64encode(raw).decode())


def add_auth_forms(username: str, password: str) -> None:
    """Register the AUTH PLAIN blob of a username/password pair as a secret too."""
    import base64

    if password:
        blob = b"\0" + username.encode() + b"\0" + password.encode()
        _SECRETS.add(base64.b64encode(blob).decode())
        add_secrets([password])


def redact(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "********")
    return text


def _redactor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if not _SECRETS:
        return event
    for key, value in list(event.items()):
        if isinstance(value, str):
            event[key] = redact(value)
        elif not isinstance(value, int | float | bool | type(None)):
            text = str(value)
            cleaned = redact(text)
            if cleaned != text:
                event[key] = cleaned
    return event


class Throttle:
    """At most one log line per interval for an event that can repeat thousands of times a
    second (refused connections, failed accept()s); the line says how many it stands for."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self.last = -interval
        self.suppressed = 0

    def hit(self) -> int | None:
        """None when this occurrence is not to be logged; else how many were not, since."""
        now = self.clock()
        if now - self.last < self.interval:
            self.suppressed += 1
            return None
        self.last, suppressed, self.suppressed = now, self.suppressed, 0
        return suppressed


class _Printable:
    """A console renderer whose lines carry no control character (text.printable).

    ConsoleRenderer quotes (repr) only values with spaces or quotes in them, and never the
    event: an address or a login name with ESC in it would reach the terminal as it came.
    The event is escaped whole (its newlines too); the rendered line is escaped per line, so
    only the renderer's own line breaks, before a traceback, remain.
    """

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        event["event"] = text.printable(str(event.get("event", "")))
        return text.printable_lines(str(self.renderer(logger, name, event)))


def setup(fmt: str = LogFormat.JSON, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib loggers libraries use; safe to call again on reload."""
    out = stream or sys.stderr
    lvl = _LEVELS.get(level, logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redactor,
    ]
    renderer: Any = (
        # ASCII JSON: every control character in a value is a \u escape (json's default).
        structlog.processors.JSONRenderer(ensure_ascii=True)
        if fmt == LogFormat.JSON
        else _Printable(structlog.dev.ConsoleRenderer(colors=False))
    )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # One write() per line, newline included: the listener and its delivery process share
        # stderr, and print()'s two writes let the other process's line land between a line
        # and its newline, so a reader of JSON lines lost both (server.started among them).
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _setup_stdlib(out, lvl, renderer)


def _setup_stdlib(out: TextIO, lvl: int, renderer: Any) -> None:
    """Route the stdlib loggers libraries use through the same redaction and renderer."""
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _redactor,
                renderer,
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # Command lines and AUTH continuations: never below INFO, normally only warnings.
    logging.getLogger("mail.log").setLevel(
        logging.INFO if lvl <= logging.DEBUG else logging.WARNING
    )
    logging.getLogger("aiosmtplib").setLevel(max(lvl, logging.INFO))
    logging.getLogger("asyncio").setLevel(max(lvl, logging.WARNING))
