"""The named states of relayd: spool directories, recipient and outcome states, modes.

Every one is a StrEnum, so it compares equal to, formats as and serialises to the same string
as before: the spool format, the config keys and the JSON on the wire are unchanged.
"""

from __future__ import annotations

from enum import StrEnum


class SpoolDir(StrEnum):
    """A directory under the spool root."""

    QUEUE = "queue"
    FAILED = "failed"
    TMP = "tmp"
    CORRUPT = "corrupt"
    OUTBOX = "outbox"


class RcptState(StrEnum):
    """A recipient's state in an envelope (the on-disk value of a refusal stays "failed")."""

    PENDING = "pending"
    DELIVERED = "delivered"
    REFUSED = "failed"


class OutcomeStatus(StrEnum):
    """What the upstream said about one recipient in one attempt."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


class TlsMode(StrEnum):
    """upstream.tls: how the provider session is encrypted."""

    IMPLICIT = "implicit"
    STARTTLS = "starttls"
    NONE = "none"


class LogFormat(StrEnum):
    """log.format."""

    JSON = "json"
    CONSOLE = "console"


class AttemptResult(StrEnum):
    """How one delivery attempt ended for a message (the history's "result", the log event)."""

    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    EXPIRED = "expired"
