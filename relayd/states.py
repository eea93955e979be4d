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


class UpstreamAuth(StrEnum):
    """upstream.auth: how relayd logs in to the provider."""

    PASSWORD = "password"  # noqa: S105 - a mode name, not a secret
    OAUTH2 = "oauth2"


class OAuth2Provider(StrEnum):
    """upstream.oauth2.provider: whose endpoints and scopes are preset."""

    GOOGLE = "google"
    MICROSOFT = "microsoft"
    CUSTOM = "custom"


class OAuth2Flow(StrEnum):
    """upstream.oauth2.flow: how access tokens are obtained."""

    REFRESH_TOKEN = "refresh_token"  # noqa: S105 - a grant type name, not a secret
    CLIENT_CREDENTIALS = "client_credentials"


class SaslMechanism(StrEnum):
    """upstream.oauth2.mechanism: the SASL mechanism that carries the bearer token."""

    XOAUTH2 = "xoauth2"
    OAUTHBEARER = "oauthbearer"


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
