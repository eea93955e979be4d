"""Configuration: YAML file, then RELAYD_<SECTION>_<KEY> overrides, validated into frozen records.

Every problem is a ConfigError naming the key, so the CLI can print one line and exit 78.
The parts live behind this module (config_records, config_values, config_env, config_rules,
config_upstreams); callers import every name from here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from relayd import presets
from relayd.config_env import apply_env
from relayd.config_records import (
    DEFAULT_SPOOL,
    NESTED,
    SECTIONS,
    Config,
    ListenConfig,
    LogConfig,
    MetricsConfig,
    OAuth2Config,
    PacingConfig,
    RelayConfig,
    RetryConfig,
    RouteConfig,
    SpoolConfig,
    UpstreamConfig,
)
from relayd.config_rules import (
    FROM_POLICIES,
    LOG_LEVELS,
    is_loopback,
    is_public,
    parse_hostport,
    rewrite_address,
    validate,
)
from relayd.config_upstreams import (
    parse_routes,
    parse_upstreams,
    resolve_redis_password,
    resolve_upstream,
)
from relayd.config_values import as_enum, parse_section
from relayd.errors import ConfigError

__all__ = [
    "DEFAULT_SPOOL",
    "FROM_POLICIES",
    "LOG_LEVELS",
    "SECTIONS",
    "Config",
    "ListenConfig",
    "LogConfig",
    "MetricsConfig",
    "OAuth2Config",
    "PacingConfig",
    "RelayConfig",
    "RetryConfig",
    "RouteConfig",
    "SpoolConfig",
    "UpstreamConfig",
    "from_json",
    "is_loopback",
    "is_public",
    "load",
    "parse_hostport",
    "rewrite_address",
    "to_json",
    "validate",
]


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
            values[key] = _rebuild(NESTED[f"{name}.{key}"], value)
        values[key] = as_enum(getattr(cls(), key), values[key])
    return cls(**values)


def _rebuild(cls: type[Any], doc: dict[str, Any]) -> Any:
    return cls(**{key: as_enum(getattr(cls(), key), value) for key, value in doc.items()})


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
    apply_env(raw, environ)
    listed, route_list = raw.pop("upstreams", None), raw.pop("routes", None)
    if listed is not None and raw.get("upstream"):
        raise ConfigError("upstreams", "set either upstreams: or upstream: (RELAYD_UPSTREAM_*)")
    if isinstance(raw.get("upstream"), dict):
        raw["upstream"] = presets.apply("upstream", raw["upstream"])
    sections = {name: parse_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown section")
    ups: tuple[UpstreamConfig, ...]
    if listed is None:
        ups = (resolve_upstream("upstream", sections["upstream"]),)
    else:
        ups = parse_upstreams(listed)
    routes = parse_routes(route_list, ups)
    sections["pacing"] = resolve_redis_password(sections["pacing"])
    cfg = Config(**{**sections, "upstream": ups[0]}, upstreams=ups, routes=routes)
    validate(cfg, serve)
    return cfg


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
