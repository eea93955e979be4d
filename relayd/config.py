"""Configuration: YAML file, then RELAYD_<SECTION>_<KEY> overrides, validated into frozen records.

Every problem is a ConfigError naming the key, so the CLI can print one line and exit 78.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from relayd import eventloop, pacing, presets, replies
from relayd.errors import ConfigError
from relayd.states import (
    LogFormat,
    OAuth2Flow,
    OAuth2Provider,
    SaslMechanism,
    TlsMode,
    UpstreamAuth,
)

DEFAULT_SPOOL = "/var/lib/relayd"
LOG_LEVELS = ("debug", "info", "warning", "error")


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
_NESTED: dict[str, type[Any]] = {"upstream.oauth2": OAuth2Config}

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


def to_json(cfg: Config) -> dict[str, Any]:
    """The whole config as plain data (secrets included: only for the delivery process)."""
    return dataclasses.asdict(cfg)


def from_json(doc: dict[str, Any]) -> Config:
    """Rebuild a Config written by to_json (already validated by the process that wrote it)."""
    sections = {name: _record(name, cls, doc.get(name, {})) for name, cls in SECTIONS.items()}
    ups = tuple(_record("upstream", UpstreamConfig, u) for u in doc.get("upstreams", ()))
    routes = tuple(_record("route", RouteConfig, r) for r in doc.get("routes", ()))
    return Config(**sections, upstreams=ups or (sections["upstream"],), routes=routes)


def _record(name: str, cls: type[Any], doc: dict[str, Any]) -> Any:
    values = dict(doc)
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
        if isinstance(value, dict):  # a nested record (upstream.oauth2)
            values[key] = _rebuild(_NESTED[f"{name}.{key}"], value)
        values[key] = _as_enum(getattr(cls(), key), values[key])
    return cls(**values)


def _rebuild(cls: type[Any], doc: dict[str, Any]) -> Any:
    return cls(**{key: _as_enum(getattr(cls(), key), value) for key, value in doc.items()})


def load(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str], serve: bool = True
) -> Config:
    """Read, override and validate; raise ConfigError naming the first bad key.

    serve=False skips what only a listening daemon needs (who may submit, the metrics
    address): a `queue` or `health` command run next to the daemon, e.g. in a second
    container with the image's environment, must not refuse over the daemon's exposure.
    """
    raw = _read_file(path) if path else {}
    if "spool" not in raw or "path" not in (raw.get("spool") or {}):
        state_dir = environ.get("STATE_DIRECTORY")  # systemd's StateDirectory=
        if state_dir:
            raw.setdefault("spool", {})
            raw["spool"] = {**(raw["spool"] or {}), "path": state_dir.split(":")[0]}
    _apply_env(raw, environ)
    listed, route_list = raw.pop("upstreams", None), raw.pop("routes", None)
    if listed is not None and raw.get("upstream"):
        raise ConfigError("upstreams", "set either upstreams: or upstream: (RELAYD_UPSTREAM_*)")
    if isinstance(raw.get("upstream"), dict):
        raw["upstream"] = presets.apply("upstream", raw["upstream"])
    sections = {name: _section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown section")
    ups: tuple[UpstreamConfig, ...]
    if listed is None:
        ups = (_resolved("upstream", sections["upstream"]),)
    else:
        ups = _upstream_list(listed)
    routes = _routes(route_list, ups)
    sections["pacing"] = _resolve_redis_password(sections["pacing"])
    cfg = Config(**{**sections, "upstream": ups[0]}, upstreams=ups, routes=routes)
    validate(cfg, serve)
    return cfg


def _resolved(key: str, up: UpstreamConfig) -> UpstreamConfig:
    """An upstream with its secrets read from their files, and validated."""
    up = _resolve_client_secret(key, _resolve_password(key, up))
    _validate_upstream(key, up)
    return up


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError("config", f"{path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must be a mapping of sections")
    return data


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith("RELAYD_"):
            continue
        rest = name[len("RELAYD_") :].lower()
        section, _, key = rest.partition("_")
        if section not in SECTIONS:
            continue  # other RELAYD_* variables (e.g. RELAYD_CONFIG) are not keys
        defaults = {f.name: f.default for f in dataclasses.fields(SECTIONS[section])}
        target, field_name, fields = _env_target(raw, section, key, defaults)
        if field_name not in fields:
            dotted = (
                f"{section}.{key}"
                if fields is defaults
                else f"{section}.{key}".replace("_", ".", 1)
            )
            raise ConfigError(dotted, f"unknown key (from {name})")
        # Strings stay verbatim: a password like "0123" or "yes" must not become 83 or True.
        target[field_name] = value if isinstance(fields[field_name], str) else _env_value(value)


def _env_target(
    raw: dict[str, Any], section: str, key: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Where RELAYD_<SECTION>_<KEY> writes: the mapping, the key in it, that record's defaults.

    RELAYD_UPSTREAM_OAUTH2_CLIENT_ID is upstream.oauth2.client_id: a nested record's name
    followed by one of its keys.
    """
    current = raw.get(section)
    raw[section] = dict(current) if isinstance(current, dict) else {}
    for nested, cls in _NESTED.items():
        outer, _, inner = nested.partition(".")
        if outer == section and key.startswith(inner + "_"):
            sub = raw[section].get(inner)
            raw[section][inner] = dict(sub) if isinstance(sub, dict) else {}
            fields = {f.name: f.default for f in dataclasses.fields(cls)}
            return raw[section][inner], key[len(inner) + 1 :], fields
    return raw[section], key, defaults


def _env_value(value: str) -> Any:
    """Environment strings are read as YAML scalars, so "1025" is an int and "true" a bool."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if parsed is None:
        return ""
    return parsed


def _section(name: str, cls: type[Any], data: Any) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(name, "must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}", "unknown key")
        if cls is UpstreamConfig and key == "replies":
            values[key] = replies.parse(f"{name}.{key}", value)
            continue
        values[key] = _coerce(f"{name}.{key}", fields[key].default, value)
    return cls(**values)


def _coerce(key: str, default: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(default):
        return _section(key, type(default), value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected a whole number, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number of seconds, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        items = [value] if isinstance(value, str) else value
        if isinstance(value, str) and "," in value:
            items = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(key, "expected a list of strings")
        return tuple(items)
    if value is None:
        return ""
    if isinstance(value, bool | dict | list):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return _as_enum(default, str(value))


def _as_enum(default: Any, value: Any) -> Any:
    """A known value of an enum-valued key as its member; anything else as is, for validate()."""
    if isinstance(default, StrEnum) and value in tuple(type(default)):
        return type(default)(value)
    return value


def _resolve_password(key: str, up: UpstreamConfig) -> UpstreamConfig:
    if up.password and up.password_file:
        raise ConfigError(f"{key}.password_file", "set either password or password_file")
    if not up.password_file:
        return up
    try:
        secret = Path(up.password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{key}.password_file", f"cannot read: {exc.strerror}") from None
    return dataclasses.replace(up, password=secret)


def _resolve_client_secret(entry: str, up: UpstreamConfig) -> UpstreamConfig:
    o = up.oauth2
    key = f"{entry}.oauth2.client_secret_file"
    if o.client_secret and o.client_secret_file:
        raise ConfigError(key, "set either client_secret or client_secret_file")
    if not o.client_secret_file:
        return up
    try:
        secret = Path(o.client_secret_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read: {exc.strerror}") from None
    return dataclasses.replace(up, oauth2=dataclasses.replace(o, client_secret=secret))


def _validate_oauth2(entry: str, up: UpstreamConfig) -> None:
    _check(up.auth in tuple(UpstreamAuth), f"{entry}.auth", "|".join(UpstreamAuth))
    if up.auth != UpstreamAuth.OAUTH2:
        return
    o, k = up.oauth2, f"{entry}.oauth2."
    _check(bool(up.username), f"{entry}.username", "required with auth: oauth2 (the mailbox)")
    _check(not up.password, f"{entry}.password", "not used with auth: oauth2; remove it")
    _check(o.provider in tuple(OAuth2Provider), k + "provider", "|".join(OAuth2Provider))
    _check(bool(o.client_id), k + "client_id", "required")
    _check(o.flow in tuple(OAuth2Flow), k + "flow", "|".join(OAuth2Flow))
    _check(o.mechanism in tuple(SaslMechanism), k + "mechanism", "|".join(SaslMechanism))
    _validate_oauth2_flow(o, k)
    _check(
        o.provider != OAuth2Provider.CUSTOM or bool(o.token_url),
        k + "token_url",
        "required for provider custom",
    )
    for name in ("token_url", "authorize_url", "device_authorization_url"):
        url = getattr(o, name)
        _check(not url or url.startswith("https://"), k + name, "must be an https:// URL")
    if o.ca_file:
        _check(Path(o.ca_file).is_file(), k + "ca_file", f"no such file: {o.ca_file}")


def _validate_oauth2_flow(o: OAuth2Config, k: str) -> None:
    if o.flow == OAuth2Flow.REFRESH_TOKEN:
        _check(
            bool(o.refresh_token_file),
            k + "refresh_token_file",
            "required (relayd oauth login writes it)",
        )
        return
    _check(
        o.provider != OAuth2Provider.GOOGLE,
        k + "flow",
        "Gmail has no client credentials flow: use refresh_token",
    )
    _check(bool(o.client_secret), k + "client_secret_file", "required for client_credentials")
    _check(
        o.provider != OAuth2Provider.MICROSOFT
        or o.tenant not in ("", "common", "organizations", "consumers"),
        k + "tenant",
        "required for client_credentials: your directory's tenant id or domain",
    )


def _resolve_redis_password(pc: PacingConfig) -> PacingConfig:
    if not pc.redis_password_file:
        return pc
    try:
        secret = Path(pc.redis_password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError("pacing.redis_password_file", f"cannot read: {exc.strerror}") from None
    return dataclasses.replace(pc, redis_password=secret)


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def validate(cfg: Config, serve: bool = True) -> None:
    """Reject impossible values; the message names the key."""
    _validate_listen(cfg.listen)
    if serve:
        _validate_exposure(cfg)
    _check(bool(cfg.spool.path), "spool.path", "must not be empty")
    _check(cfg.pacing.fleet_size >= 1, "pacing.fleet_size", "must be >= 1")
    if cfg.pacing.redis:
        _check(
            cfg.pacing.redis.startswith(("redis://", "rediss://", "unix://")),
            "pacing.redis",
            "expected redis://host:port/db (or rediss://, unix://)",
        )
    rt = cfg.retry
    _check(rt.initial_delay > 0, "retry.initial_delay", "must be > 0")
    _check(rt.max_delay >= rt.initial_delay, "retry.max_delay", "must be >= initial_delay")
    _check(rt.max_age > 0, "retry.max_age", "must be > 0")
    _check(cfg.log.format in tuple(LogFormat), "log.format", "|".join(LogFormat))
    _check(
        cfg.relay.event_loop in eventloop.CHOICES, "relay.event_loop", "|".join(eventloop.CHOICES)
    )
    _check(
        cfg.relay.event_loop != "uvloop" or eventloop.available(),
        "relay.event_loop",
        "uvloop is not installed (pip install 'relayd[uvloop]')",
    )
    _check(cfg.log.level in LOG_LEVELS, "log.level", "|".join(LOG_LEVELS))
    _check(cfg.relay.hang_timeout > 0, "relay.hang_timeout", "must be > 0")
    _check(cfg.relay.rescan_interval > 0, "relay.rescan_interval", "must be > 0")


def _validate_listen(ls: ListenConfig) -> None:
    _check(0 <= ls.port <= 65535, "listen.port", "must be 0..65535")
    _check(bool(ls.hostname.strip()), "listen.hostname", "must not be empty")
    _check(ls.max_message_size > 0, "listen.max_message_size", "must be > 0")
    _check(ls.max_recipients > 0, "listen.max_recipients", "must be > 0")
    _check(ls.timeout > 0, "listen.timeout", "must be > 0")
    _check(ls.max_sessions >= 1, "listen.max_sessions", "must be >= 1")


def _validate_exposure(cfg: Config) -> None:
    """The listener's and the metrics endpoint's addresses: only `serve` binds them."""
    ls = cfg.listen
    for cidr in ls.allowed_networks:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError("listen.allowed_networks", f"not a network: {cidr!r}") from None
    if not is_loopback(ls.host):
        _check(
            bool(ls.allowed_networks or ls.users_file),
            "listen.allowed_networks",
            f"required when listen.host ({ls.host}) is not loopback: list who may submit",
        )
    if ls.users_file:
        _check(Path(ls.users_file).is_file(), "listen.users_file", f"no such file: {ls.users_file}")
        # The listener has no TLS: AUTH would cross the wire readable to anyone on the path.
        _check(
            not is_public(ls.host),
            "listen.users_file",
            f"AUTH is plaintext here; bind {ls.host} only on loopback or a private network",
        )
    if cfg.metrics.listen:
        parse_hostport("metrics.listen", cfg.metrics.listen)


# -- upstreams: and routes: ---------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # a metric label and a CLI argument
FROM_POLICIES = ("keep", "rewrite")


def _upstream_list(listed: Any) -> tuple[UpstreamConfig, ...]:
    """`upstreams:` as records, in order; names unique, each entry valid."""
    if not isinstance(listed, list) or not listed:
        raise ConfigError("upstreams", "expected a non-empty list of upstreams")
    ups: list[UpstreamConfig] = []
    for i, entry in enumerate(listed):
        key = f"upstreams[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(key, "must be a mapping")
        if not entry.get("name"):
            raise ConfigError(f"{key}.name", "required (a unique name for this upstream)")
        up = _resolved(key, _section(key, UpstreamConfig, presets.apply(key, entry)))
        _check(bool(up.host), f"{key}.host", "required (or a preset that names it)")
        if any(u.name == up.name for u in ups):
            raise ConfigError(f"{key}.name", f"{up.name!r} is already the name of an upstream")
        ups.append(up)
    return tuple(ups)


def _validate_upstream(key: str, up: UpstreamConfig) -> None:
    """Reject an impossible upstream entry; the message names the key."""
    _check(bool(_NAME.match(up.name)), f"{key}.name", "letters, digits, '.', '_' and '-' only")
    _check(1 <= up.port <= 65535, f"{key}.port", "must be 1..65535")
    _check(up.tls in tuple(TlsMode), f"{key}.tls", "|".join(TlsMode))
    _check(up.timeout > 0, f"{key}.timeout", "must be > 0")
    _check(up.max_connections >= 1, f"{key}.max_connections", "must be >= 1")
    _check(up.max_messages_per_session >= 1, f"{key}.max_messages_per_session", "must be >= 1")
    _check(up.failure_threshold >= 1, f"{key}.failure_threshold", "must be >= 1")
    _check(up.cooldown >= 0, f"{key}.cooldown", "must be >= 0")
    _check(
        up.max_cooldown == 0 or up.max_cooldown >= up.cooldown,
        f"{key}.max_cooldown",
        "must be >= cooldown",
    )
    _check(
        up.ehlo_name.isascii() and up.ehlo_name.isprintable() and " " not in up.ehlo_name,
        f"{key}.ehlo_name",
        "must be a host name (no spaces or control characters)",
    )
    if up.ca_file:
        _check(Path(up.ca_file).is_file(), f"{key}.ca_file", f"no such file: {up.ca_file}")
    if up.password and not up.username:
        raise ConfigError(f"{key}.username", "required when a password is set")
    _check(up.from_policy in FROM_POLICIES, f"{key}.from_policy", "|".join(FROM_POLICIES))
    _validate_oauth2(key, up)
    _validate_pacing(key, up)
    if up.from_policy == "rewrite":
        _check(
            "@" in rewrite_address(up),
            f"{key}.rewrite_from",
            "required with from_policy: rewrite when username is not an address",
        )


def rewrite_address(up: UpstreamConfig) -> str:
    """The address a rewriting upstream sends as: rewrite_from, else the username."""
    return up.rewrite_from or up.username


def _routes(route_list: Any, ups: tuple[UpstreamConfig, ...]) -> tuple[RouteConfig, ...]:
    """`routes:` as records; every `via` names configured upstreams."""
    if route_list is None:
        return ()
    if not isinstance(route_list, list):
        raise ConfigError("routes", "expected a list of routes")
    names = [u.name for u in ups]
    routes = []
    for i, entry in enumerate(route_list):
        key = f"routes[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(key, "must be a mapping")
        unknown = set(entry) - {"name", "match", "via"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key (name, match, via)")
        match = entry.get("match") or {}
        if not isinstance(match, dict) or set(match) - {"sender", "from"}:
            raise ConfigError(f"{key}.match", "expected a mapping with sender and/or from")
        via = _globs(f"{key}.via", entry.get("via"))
        _check(bool(via), f"{key}.via", "required: the upstreams to use, in order")
        for name in via:
            _check(name in names, f"{key}.via", f"no upstream is called {name!r}")
        routes.append(
            RouteConfig(
                name=str(entry.get("name") or f"routes[{i}]"),
                senders=_globs(f"{key}.match.sender", match.get("sender")),
                header_from=_globs(f"{key}.match.from", match.get("from")),
                via=via,
            )
        )
    return tuple(routes)


def _globs(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise ConfigError(key, "expected a string or a list of strings")
    return tuple(items)


def _validate_pacing(key: str, up: UpstreamConfig) -> None:
    if up.rate:
        try:
            pacing.parse_rate(up.rate)
        except ValueError as exc:
            raise ConfigError(f"{key}.rate", str(exc)) from None
    _check(up.burst >= 1, f"{key}.burst", "must be >= 1")
    _check(up.daily >= 0, f"{key}.daily", "must be >= 0 (0: no daily limit)")
    _check(up.daily_unit in pacing.UNITS, f"{key}.daily_unit", "|".join(pacing.UNITS))
    _check(up.daily_window in pacing.WINDOWS, f"{key}.daily_window", "|".join(pacing.WINDOWS))


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
