"""`upstreams:`, presets and `routes:` in the config: what they resolve to, what they refuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from relayd import config as config_mod
from relayd import presets
from relayd.errors import ConfigError


def load(tmp_path: Path, doc: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(doc))
    return config_mod.load(path, env or {})


def refused(tmp_path: Path, doc: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, doc, env)
    return str(info.value)


def test_the_single_upstream_section_is_one_upstream_named_default():
    """upstream: / RELAYD_UPSTREAM_* keep working: one upstream called default, unchanged."""
    cfg = config_mod.load(None, {"RELAYD_UPSTREAM_HOST": "smtp.example.com"})
    assert [u.name for u in cfg.upstreams] == ["default"]
    assert cfg.upstreams[0] == cfg.upstream
    assert (cfg.upstream.host, cfg.upstream.port, cfg.upstream.tls) == (
        "smtp.example.com",
        465,
        "implicit",
    )


def test_a_preset_from_the_environment_fills_host_port_and_tls():
    """RELAYD_UPSTREAM_PRESET=gmail is smtp.gmail.com:465, implicit TLS."""
    cfg = config_mod.load(None, {"RELAYD_UPSTREAM_PRESET": "gmail"})
    assert (cfg.upstream.host, cfg.upstream.port, cfg.upstream.tls) == (
        "smtp.gmail.com",
        465,
        "implicit",
    )


def test_m365_is_starttls_on_587_with_three_connections(tmp_path):
    """Microsoft 365 offers no implicit TLS: the preset never uses 465."""
    cfg = load(tmp_path, {"upstreams": [{"name": "o", "preset": "m365", "username": "a@b.c"}]})
    up = cfg.upstreams[0]
    assert (up.host, up.port, up.tls, up.max_connections) == (
        "smtp.office365.com",
        587,
        "starttls",
        3,
    )


def test_every_key_of_an_entry_overrides_its_preset(tmp_path):
    """An entry's own host, port and max_connections win over its preset's."""
    entry = {"name": "s", "preset": "sendgrid", "host": "relay.test", "max_connections": 9}
    up = load(tmp_path, {"upstreams": [entry]}).upstreams[0]
    assert (up.host, up.port, up.max_connections, up.username) == ("relay.test", 465, 9, "apikey")


def test_ses_needs_a_region_and_builds_its_host_from_it(tmp_path):
    """preset ses without region is refused; with one it is that region's endpoint."""
    assert "upstreams[0].region: required" in refused(
        tmp_path, {"upstreams": [{"name": "ses", "preset": "ses"}]}
    )
    entry = {"name": "ses", "preset": "ses", "region": "eu-west-1"}
    up = load(tmp_path, {"upstreams": [entry]}).upstreams[0]
    assert up.host == "email-smtp.eu-west-1.amazonaws.com"


def test_a_preset_fills_its_published_limits(tmp_path):
    """m365 without pacing keys: 30/minute, 10,000 recipients over a rolling 24 h."""
    cfg = load(tmp_path, {"upstreams": [{"name": "o", "preset": "m365", "username": "a@b.c"}]})
    up = cfg.upstreams[0]
    assert (up.rate, up.daily, up.daily_unit, up.daily_window) == (
        "30/minute",
        10000,
        "recipients",
        "rolling",
    )


def test_each_pacing_key_of_an_entry_overrides_its_preset(tmp_path):
    """rate: none and daily: none mean no limit; a set key wins; unset keys keep the preset's."""
    entries = [
        {"name": "a", "preset": "m365", "rate": "none", "daily": "none"},
        {"name": "b", "preset": "m365", "rate": "", "daily": 0},
        {"name": "c", "preset": "m365", "rate": None, "daily": None},
        {"name": "d", "preset": "ses", "region": "eu-west-1", "rate": "5/second"},
        {"name": "e", "preset": "gmail", "daily": 100, "daily_window": "calendar"},
    ]
    ups = {u.name: u for u in load(tmp_path, {"upstreams": entries}).upstreams}
    for name in "abc":
        assert (ups[name].rate, ups[name].daily) == ("", 0), name
    assert (ups["d"].rate, ups["d"].daily, ups["d"].daily_unit) == ("5/second", 200, "recipients")
    assert (ups["e"].rate, ups["e"].daily, ups["e"].daily_window) == ("", 100, "calendar")


def test_no_limit_from_the_environment_overrides_a_preset():
    """RELAYD_UPSTREAM_RATE=none with RELAYD_UPSTREAM_PRESET=m365: no rate, the daily stays."""
    env = {"RELAYD_UPSTREAM_PRESET": "m365", "RELAYD_UPSTREAM_RATE": "none"}
    up = config_mod.load(None, env).upstream
    assert (up.rate, up.daily) == ("", 10000)


def test_every_preset_limit_is_a_valid_pacing_setting(tmp_path):
    """Each preset's published limits load as an upstream's pacing keys (rate parses)."""
    for name in presets.PRESETS:
        entry = {"name": "p", "preset": name, "region": "us-east-1", "username": "u@x.test"}
        up = load(tmp_path, {"upstreams": [entry]}).upstreams[0]
        assert up.rate == presets.PRESETS[name].limits.rate, name
        assert up.daily == presets.PRESETS[name].limits.daily, name


def test_every_preset_resolves_and_starttls_ones_are_never_on_465():
    """The table is consistent: each preset builds, implicit only on 465, STARTTLS on 587."""
    for name, preset in presets.PRESETS.items():
        host = presets.host(preset, "us-east-1")
        assert host and preset.tls in ("implicit", "starttls"), name
        assert (preset.tls, preset.port) in (("implicit", 465), ("starttls", 587)), name


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"upstreams": [{"host": "a"}]}, "upstreams[0].name: required"),
        (
            {"upstreams": [{"name": "a", "host": "a"}, {"name": "a", "host": "b"}]},
            "upstreams[1].name: 'a' is already",
        ),
        ({"upstreams": [{"name": "a", "preset": "gmial"}]}, "upstreams[0].preset: unknown preset"),
        ({"upstreams": [{"name": "a"}]}, "upstreams[0].host: required"),
        ({"upstreams": [{"name": "a", "host": "a", "port": 0}]}, "upstreams[0].port"),
        (
            {"upstreams": [{"name": "a", "host": "a"}], "routes": [{"via": ["b"]}]},
            "routes[0].via: no upstream is called 'b'",
        ),
        ({"upstreams": [{"name": "a", "host": "a"}], "routes": [{"match": {}}]}, "routes[0].via"),
        (
            {"upstreams": [{"name": "a", "host": "a"}], "upstream": {"host": "b"}},
            "set either upstreams: or upstream:",
        ),
        (
            {"upstreams": [{"name": "a", "host": "a", "from_policy": "rewrite"}]},
            "upstreams[0].rewrite_from: required",
        ),
    ],
)
def test_a_bad_upstreams_or_routes_entry_is_one_error_naming_it(tmp_path, doc, problem):
    """Each mistake is a ConfigError naming the entry and the key."""
    assert problem in refused(tmp_path, doc)


def test_routes_and_upstreams_survive_the_trip_to_the_delivery_process(tmp_path):
    """to_json/from_json (the pipe to the delivery process) keeps lists, routes and secrets."""
    doc = {
        "upstreams": [
            {"name": "a", "host": "a.test", "username": "u@a", "password": "pw-a-123"},
            {"name": "b", "preset": "m365", "allowed_from": ["*@b.test"]},
        ],
        "routes": [{"name": "r", "match": {"sender": "*@b.test", "from": "*"}, "via": ["b", "a"]}],
    }
    cfg = load(tmp_path, doc)
    assert config_mod.from_json(config_mod.to_json(cfg)) == cfg
    assert cfg.routes[0].via == ("b", "a") and cfg.routes[0].header_from == ("*",)
