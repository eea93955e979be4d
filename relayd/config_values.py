"""A section's mapping (YAML or environment) as its record: keys checked, values coerced.

Every problem is a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from typing import Any

from relayd import replies
from relayd.config_records import UpstreamConfig
from relayd.errors import ConfigError


def parse_section(name: str, cls: type[Any], data: Any) -> Any:
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
        return parse_section(key, type(default), value)
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
    return as_enum(default, str(value))


def as_enum(default: Any, value: Any) -> Any:
    """A known value of an enum-valued key as its member; anything else as is, for validate()."""
    if isinstance(default, StrEnum) and value in tuple(type(default)):
        return type(default)(value)
    return value
