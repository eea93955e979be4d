"""Validation: reject impossible values, each with a ConfigError naming the key."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from relayd import eventloop, pacing
from relayd.config_records import Config, ListenConfig, OAuth2Config, UpstreamConfig
from relayd.errors import ConfigError
from relayd.states import (
    LogFormat,
    OAuth2Flow,
    OAuth2Provider,
    SaslMechanism,
    TlsMode,
    UpstreamAuth,
)

LOG_LEVELS = ("debug", "info", "warning", "error")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # a metric label and a CLI argument
FROM_POLICIES = ("keep", "rewrite")


def check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def validate(cfg: Config, serve: bool = True) -> None:
    """Reject impossible values; the message names the key."""
    _validate_listen(cfg.listen)
    if serve:
        _validate_exposure(cfg)
    check(bool(cfg.spool.path), "spool.path", "must not be empty")
    check(cfg.pacing.fleet_size >= 1, "pacing.fleet_size", "must be >= 1")
    if cfg.pacing.redis:
        check(
            cfg.pacing.redis.startswith(("redis://", "rediss://", "unix://")),
            "pacing.redis",
            "expected redis://host:port/db (or rediss://, unix://)",
        )
    rt = cfg.retry
    check(rt.initial_delay > 0, "retry.initial_delay", "must be > 0")
    check(rt.max_delay >= rt.initial_delay, "retry.max_delay", "must be >= initial_delay")
    check(rt.max_age > 0, "retry.max_age", "must be > 0")
    check(cfg.log.format in tuple(LogFormat), "log.format", "|".join(LogFormat))
    check(
        cfg.relay.event_loop in eventloop.CHOICES, "relay.event_loop", "|".join(eventloop.CHOICES)
    )
    check(
        cfg.relay.event_loop != "uvloop" or eventloop.available(),
        "relay.event_loop",
        "uvloop is not installed (pip install 'relayd[uvloop]')",
    )
    check(cfg.log.level in LOG_LEVELS, "log.level", "|".join(LOG_LEVELS))
    check(cfg.relay.hang_timeout > 0, "relay.hang_timeout", "must be > 0")
    check(cfg.relay.rescan_interval > 0, "relay.rescan_interval", "must be > 0")


def _validate_listen(ls: ListenConfig) -> None:
    check(0 <= ls.port <= 65535, "listen.port", "must be 0..65535")
    check(bool(ls.hostname.strip()), "listen.hostname", "must not be empty")
    check(ls.max_message_size > 0, "listen.max_message_size", "must be > 0")
    check(ls.max_recipients > 0, "listen.max_recipients", "must be > 0")
    check(ls.timeout > 0, "listen.timeout", "must be > 0")
    check(ls.max_sessions >= 1, "listen.max_sessions", "must be >= 1")


def _validate_exposure(cfg: Config) -> None:
    """The listener's and the metrics endpoint's addresses: only `serve` binds them."""
    ls = cfg.listen
    for cidr in ls.allowed_networks:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError("listen.allowed_networks", f"not a network: {cidr!r}") from None
    if not is_loopback(ls.host):
        check(
            bool(ls.allowed_networks or ls.users_file),
            "listen.allowed_networks",
            f"required when listen.host ({ls.host}) is not loopback: list who may submit",
        )
    if ls.users_file:
        check(Path(ls.users_file).is_file(), "listen.users_file", f"no such file: {ls.users_file}")
        # The listener has no TLS: AUTH would cross the wire readable to anyone on the path.
        check(
            not is_public(ls.host),
            "listen.users_file",
            f"AUTH is plaintext here; bind {ls.host} only on loopback or a private network",
        )
    if cfg.metrics.listen:
        parse_hostport("metrics.listen", cfg.metrics.listen)


def validate_upstream(key: str, up: UpstreamConfig) -> None:
    """Reject an impossible upstream entry; the message names the key."""
    check(bool(_NAME.match(up.name)), f"{key}.name", "letters, digits, '.', '_' and '-' only")
    check(1 <= up.port <= 65535, f"{key}.port", "must be 1..65535")
    check(up.tls in tuple(TlsMode), f"{key}.tls", "|".join(TlsMode))
    check(up.timeout > 0, f"{key}.timeout", "must be > 0")
    check(up.max_connections >= 1, f"{key}.max_connections", "must be >= 1")
    check(up.max_messages_per_session >= 1, f"{key}.max_messages_per_session", "must be >= 1")
    check(up.failure_threshold >= 1, f"{key}.failure_threshold", "must be >= 1")
    check(up.cooldown >= 0, f"{key}.cooldown", "must be >= 0")
    check(
        up.max_cooldown == 0 or up.max_cooldown >= up.cooldown,
        f"{key}.max_cooldown",
        "must be >= cooldown",
    )
    check(
        up.ehlo_name.isascii() and up.ehlo_name.isprintable() and " " not in up.ehlo_name,
        f"{key}.ehlo_name",
        "must be a host name (no spaces or control characters)",
    )
    if up.ca_file:
        check(Path(up.ca_file).is_file(), f"{key}.ca_file", f"no such file: {up.ca_file}")
    if up.password and not up.username:
        raise ConfigError(f"{key}.username", "required when a password is set")
    check(up.from_policy in FROM_POLICIES, f"{key}.from_policy", "|".join(FROM_POLICIES))
    _validate_oauth2(key, up)
    _validate_pacing(key, up)
    if up.from_policy == "rewrite":
        check(
            "@" in rewrite_address(up),
            f"{key}.rewrite_from",
            "required with from_policy: rewrite when username is not an address",
        )


def rewrite_address(up: UpstreamConfig) -> str:
    """The address a rewriting upstream sends as: rewrite_from, else the username."""
    return up.rewrite_from or up.username


def _validate_oauth2(entry: str, up: UpstreamConfig) -> None:
    check(up.auth in tuple(UpstreamAuth), f"{entry}.auth", "|".join(UpstreamAuth))
    if up.auth != UpstreamAuth.OAUTH2:
        return
    o, k = up.oauth2, f"{entry}.oauth2."
    check(bool(up.username), f"{entry}.username", "required with auth: oauth2 (the mailbox)")
    check(not up.password, f"{entry}.password", "not used with auth: oauth2; remove it")
    check(o.provider in tuple(OAuth2Provider), k + "provider", "|".join(OAuth2Provider))
    check(bool(o.client_id), k + "client_id", "required")
    check(o.flow in tuple(OAuth2Flow), k + "flow", "|".join(OAuth2Flow))
    check(o.mechanism in tuple(SaslMechanism), k + "mechanism", "|".join(SaslMechanism))
    _validate_oauth2_flow(o, k)
    check(
        o.provider != OAuth2Provider.CUSTOM or bool(o.token_url),
        k + "token_url",
        "required for provider custom",
    )
    for name in ("token_url", "authorize_url", "device_authorization_url"):
        url = getattr(o, name)
        check(not url or url.startswith("https://"), k + name, "must be an https:// URL")
    if o.ca_file:
        check(Path(o.ca_file).is_file(), k + "ca_file", f"no such file: {o.ca_file}")


def _validate_oauth2_flow(o: OAuth2Config, k: str) -> None:
    if o.flow == OAuth2Flow.REFRESH_TOKEN:
        check(
            bool(o.refresh_token_file),
            k + "refresh_token_file",
            "required (relayd oauth login writes it)",
        )
        return
    check(
        o.provider != OAuth2Provider.GOOGLE,
        k + "flow",
        "Gmail has no client credentials flow: use refresh_token",
    )
    check(bool(o.client_secret), k + "client_secret_file", "required for client_credentials")
    check(
        o.provider != OAuth2Provider.MICROSOFT
        or o.tenant not in ("", "common", "organizations", "consumers"),
        k + "tenant",
        "required for client_credentials: your directory's tenant id or domain",
    )


def _validate_pacing(key: str, up: UpstreamConfig) -> None:
    if up.rate:
        try:
            pacing.parse_rate(up.rate)
        except ValueError as exc:
            raise ConfigError(f"{key}.rate", str(exc)) from None
    check(up.burst >= 1, f"{key}.burst", "must be >= 1")
    check(up.daily >= 0, f"{key}.daily", "must be >= 0 (0: no daily limit)")
    check(up.daily_unit in pacing.UNITS, f"{key}.daily_unit", "|".join(pacing.UNITS))
    check(up.daily_window in pacing.WINDOWS, f"{key}.daily_window", "|".join(pacing.WINDOWS))


def parse_hostport(key: str, value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:9025"); raise ConfigError naming key."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected host:port, got {value!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_public(host: str) -> bool:
    """A literal address routable on the internet (0.0.0.0 and names are not judged here)."""
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return False
