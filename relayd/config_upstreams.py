"""upstreams: and routes: as records, and the secrets an upstream or Redis reads from files."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from relayd import presets
from relayd.config_records import PacingConfig, RouteConfig, UpstreamConfig
from relayd.config_rules import check, validate_upstream
from relayd.config_values import parse_section
from relayd.errors import ConfigError


def resolve_upstream(key: str, up: UpstreamConfig) -> UpstreamConfig:
    """An upstream with its secrets read from their files, and validated."""
    up = _resolve_client_secret(key, _resolve_password(key, up))
    validate_upstream(key, up)
    return up


def parse_upstreams(listed: Any) -> tuple[UpstreamConfig, ...]:
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
        up = resolve_upstream(key, parse_section(key, UpstreamConfig, presets.apply(key, entry)))
        check(bool(up.host), f"{key}.host", "required (or a preset that names it)")
        if any(u.name == up.name for u in ups):
            raise ConfigError(f"{key}.name", f"{up.name!r} is already the name of an upstream")
        ups.append(up)
    return tuple(ups)


def parse_routes(route_list: Any, ups: tuple[UpstreamConfig, ...]) -> tuple[RouteConfig, ...]:
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
        check(bool(via), f"{key}.via", "required: the upstreams to use, in order")
        for name in via:
            check(name in names, f"{key}.via", f"no upstream is called {name!r}")
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


def resolve_redis_password(pc: PacingConfig) -> PacingConfig:
    if not pc.redis_password_file:
        return pc
    try:
        secret = Path(pc.redis_password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError("pacing.redis_password_file", f"cannot read: {exc.strerror}") from None
    return dataclasses.replace(pc, redis_password=secret)
