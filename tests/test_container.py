"""The image's and the Compose example's RELAYD_* settings are real, valid config.

No container engine runs here (hadolint lints the Dockerfile in CI); these tests feed the
variables the Dockerfile and docker-compose.yml set through relayd's own config loader.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from relayd import config as config_mod
from relayd.errors import ConfigError

ROOT = Path(__file__).parent.parent


def dockerfile_env() -> dict[str, str]:
    """KEY=value pairs of the Dockerfile's ENV instructions (continuations joined)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_image_alone_refuses_to_listen_openly():
    """The image binds 0.0.0.0 but leaves allowed_networks unset: start-up names the key."""
    env = {**dockerfile_env(), "RELAYD_UPSTREAM_HOST": "smtp.example.com"}
    assert env["RELAYD_LISTEN_HOST"] == "0.0.0.0"
    with pytest.raises(ConfigError) as err:
        config_mod.load(None, env)
    assert "listen.allowed_networks" in str(err.value)


def test_compose_relayd_settings_load(tmp_path):
    """Image ENV + the Compose service's environment load, with the password from the file."""
    service = compose()["services"]["relayd"]
    secret = tmp_path / "smtp_password"
    secret.write_text("from-the-secret\n")
    env = {**dockerfile_env(), **{k: str(v) for k, v in service["environment"].items()}}
    assert env["RELAYD_UPSTREAM_PASSWORD_FILE"] == "/run/secrets/smtp_password"
    env["RELAYD_UPSTREAM_PASSWORD_FILE"] = str(secret)
    cfg = config_mod.load(None, env)
    assert cfg.upstream.password == "from-the-secret"
    assert cfg.listen.allowed_networks == ("172.30.25.0/24",)
    assert cfg.spool.path == "/var/lib/relayd"


def test_compose_wires_app_to_relayd_over_the_allowed_network():
    """The app talks to relayd:1025; the network's subnet is the one allowed to submit."""
    doc = compose()
    app, relayd = doc["services"]["app"], doc["services"]["relayd"]
    assert (app["environment"]["SMTP_HOST"], app["environment"]["SMTP_PORT"]) == ("relayd", "1025")
    subnet = doc["networks"]["mail"]["ipam"]["config"][0]["subnet"]
    assert relayd["environment"]["RELAYD_LISTEN_ALLOWED_NETWORKS"] == subnet
    assert "ports" not in relayd, "1025 must not be published on the host"
    assert relayd["volumes"] == ["relayd-spool:/var/lib/relayd"]
    assert "smtp_password" in doc["secrets"]
