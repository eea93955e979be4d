"""RELAYD_<SECTION>_<KEY> environment variables written over the file's mapping."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import yaml

from relayd.config_records import NESTED, SECTIONS
from relayd.errors import ConfigError


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
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
    for nested, cls in NESTED.items():
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
