"""The configuration's records: one frozen record per section, with its defaults.

relayd.config loads them (relayd.config_values, config_env, config_rules, config_upstreams
do the parts); callers import them from relayd.config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from relayd.states import (
    LogFormat,
    OAuth2Flow,
    SaslMechanism,
    TlsMode,
    UpstreamAuth,
)

DEFAULT_SPOOL = "/var/lib/relayd"


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 1025
    hostname: str = "localhost"
    max_message_size: int = 26_214_400  # 25 MiB, as Gmail takes
    max_recipients: int = 100
    timeout: float = 60.0  # idle seconds before a client session is closed
    # Concurrent client sessions; more get 421 4.7.0 and are closed. One descriptor each:
    # keep it well under the process's RLIMIT_NOFILE (LimitNOFILE= in the systemd unit).
    max_sessions: int = 100
    # Networks allowed to submit besides loopback; required when host is not loopback.
    allowed_networks: tuple[str, ...] = ()
    # name:scrypt$… lines (relayd passwd); when set, other peers may submit after AUTH.
    users_file: str = ""


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: str = DEFAULT_SPOOL


@dataclass(frozen=True, slots=True)
class OAuth2Config:
    """How relayd obtains the access tokens it logs in with (auth: oauth2); see docs/oauth.md."""

    provider: str = ""  # google | microsoft | custom (OAuth2Provider)
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    client_secret_file: str = ""
    tenant: str = ""  # microsoft: the directory (id or domain); empty = "organizations"
    scope: str = ""  # empty = the provider's preset
    refresh_token_file: str = ""  # written by `relayd oauth login`, rewritten when rotated
    flow: OAuth2Flow = OAuth2Flow.REFRESH_TOKEN
    token_url: str = ""  # custom, or an override of the provider's
    authorize_url: str = ""
    device_authorization_url: str = ""
    # The SASL mechanism; the other one is used when it is the only one the server offers.
    mechanism: SaslMechanism = SaslMechanism.XOAUTH2
    ca_file: str = ""  # extra CA for the token endpoint's certificate


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str = "default"  # unique among upstreams:; labels logs, metrics, history, check
    preset: str = ""  # a provider from relayd.presets; the entry's own keys override it
    region: str = ""  # for presets with regions (ses)
    host: str = ""
    port: int = 465
    tls: TlsMode = TlsMode.IMPLICIT
    verify: bool = True
    ca_file: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""
    timeout: float = 30.0
    max_connections: int = 4
    # Messages one session carries before it logs out and a fresh one starts.
    max_messages_per_session: int = 100
    # The name relayd gives in EHLO to the provider; empty: listen.hostname (Config.ehlo_name).
    ehlo_name: str = ""
    # Pacing (docs/providers.md has each provider's figures): a GCRA rate such as "30/minute"
    # with a burst of messages that may go at once, and a daily quota counted as the provider
    # counts it (messages or recipients) over a rolling 24 h or a calendar (UTC) day.
    rate: str = ""
    burst: int = 1
    daily: int = 0
    daily_unit: str = "messages"
    daily_window: str = "rolling"
    # The quota a fleet shares through pacing.redis; default: host + username.
    account: str = ""
    # [{match: REGEX, action: pause|throttle|reauth|retry|fail, for: SECONDS}], tried first.
    replies: tuple[dict[str, Any], ...] = ()
    auth: UpstreamAuth = UpstreamAuth.PASSWORD
    oauth2: OAuth2Config = OAuth2Config()
    # Circuit breaker: connection-level failures in a row before the upstream is open, and
    # how long it then rests before one probe (doubling per failed probe); 0 = retry's delays.
    failure_threshold: int = 3
    cooldown: float = 0.0
    max_cooldown: float = 0.0
    # keep | rewrite: envelope sender and header From become rewrite_from (default username).
    from_policy: str = "keep"
    rewrite_from: str = ""
    rewrite_signed: bool = False  # rewrite even a message with a DKIM-Signature (breaks it)
    allowed_from: tuple[str, ...] = ()  # sender globs this upstream accepts; () = any


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str = ""
    senders: tuple[str, ...] = ()  # match.sender: envelope sender globs
    header_from: tuple[str, ...] = ()  # match.from: header From globs
    via: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RetryConfig:
    initial_delay: float = 60.0
    max_delay: float = 3600.0
    max_age: float = 432_000.0  # 5 days, Postfix's maximal_queue_lifetime


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: LogFormat = LogFormat.JSON
    level: str = "info"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = ""  # "host:port"; empty = no HTTP endpoint


@dataclass(frozen=True, slots=True)
class RelayConfig:
    # Deliveries run in a second process over the same spool, so accepting and relaying each
    # get a CPU core; false keeps both on one event loop (one process, less memory).
    separate_process: bool = True
    # auto: uvloop when installed (pip install 'relayd[uvloop]'), else asyncio. Read at start-up.
    event_loop: str = "auto"
    # A delivery process that sends the listener no report for this long (it reports twice a
    # second) is stuck: it is killed and a new one started.
    hang_timeout: float = 30.0
    # Seconds between safety rescans of queue/ by the delivery loop: a message the index missed
    # (a lost notification, a file written behind the daemon's back) waits at most this long.
    rescan_interval: float = 300.0


@dataclass(frozen=True, slots=True)
class PacingConfig:
    # redis://host:port/db shared by every relayd sending through the same accounts.
    redis: str = ""
    redis_password_file: str = ""
    redis_password: str = field(default="", repr=False)
    # Relayds sharing the accounts: without Redis each keeps to 1/fleet_size of every limit.
    fleet_size: int = 1


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig = ListenConfig()
    spool: SpoolConfig = SpoolConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    retry: RetryConfig = RetryConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    relay: RelayConfig = RelayConfig()
    pacing: PacingConfig = PacingConfig()
    # Resolved at load: the upstreams: list, or the single upstream: section named "default".
    upstreams: tuple[UpstreamConfig, ...] = (UpstreamConfig(),)
    routes: tuple[RouteConfig, ...] = ()

    @property
    def ehlo_name(self) -> str:
        """What relayd says in EHLO to the provider: upstream.ehlo_name, else listen.hostname."""
        return self.upstream.ehlo_name or self.listen.hostname


# Records inside a section: YAML mappings, and RELAYD_UPSTREAM_OAUTH2_<KEY> in the environment.
NESTED: dict[str, type[Any]] = {"upstream.oauth2": OAuth2Config}

SECTIONS: dict[str, type[Any]] = {
    "listen": ListenConfig,
    "spool": SpoolConfig,
    "upstream": UpstreamConfig,
    "retry": RetryConfig,
    "log": LogConfig,
    "metrics": MetricsConfig,
    "relay": RelayConfig,
    "pacing": PacingConfig,
}
