"""Configuration: defaults, RELAYD_* overrides, secrets from files, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from relayd import config
from relayd.errors import ConfigError


def test_defaults_are_safe():
    """Loopback listener, implicit TLS on 465, verification on."""
    cfg = config.load(None, {})
    assert (cfg.listen.host, cfg.listen.port) == ("127.0.0.1", 1025)
    assert (cfg.upstream.port, cfg.upstream.tls, cfg.upstream.verify) == (465, "implicit", True)
    assert cfg.listen.max_recipients == 100


def test_environment_overrides_file(tmp_path):
    """RELAYD_<SECTION>_<KEY> wins over the file and is typed by the key."""
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  host: smtp.gmail.com\n  port: 465\nretry:\n  max_age: 100\n")
    cfg = config.load(
        path,
        {
            "RELAYD_UPSTREAM_PORT": "2465",
            "RELAYD_UPSTREAM_VERIFY": "false",
            "RELAYD_UPSTREAM_USERNAME": "0123",
        },
    )
    assert cfg.upstream.host == "smtp.gmail.com"
    assert cfg.upstream.port == 2465 and cfg.upstream.verify is False
    assert cfg.upstream.username == "0123"  # strings stay strings
    assert cfg.retry.max_age == 100.0


def test_password_file_is_read_and_hidden_from_repr(tmp_path):
    """The secret comes from a file, loses its newline and never shows in repr()."""
    secret = tmp_path / "pw"
    secret.write_text("hunter2-long\n")
    cfg = config.load(
        None, {"RELAYD_UPSTREAM_USERNAME": "u", "RELAYD_UPSTREAM_PASSWORD_FILE": str(secret)}
    )
    assert cfg.upstream.password == "hunter2-long"
    assert "hunter2" not in repr(cfg)


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("listen:\n  prot: 25\n", "listen.prot"),
        ("listen:\n  port: many\n", "listen.port"),
        ("listen:\n  port: 70000\n", "listen.port"),
        ("upstream:\n  tls: maybe\n", "upstream.tls"),
        ("relay:\n  event_loop: fast\n", "relay.event_loop"),
        ("upstream:\n  verify: 'no'\n", "upstream.verify"),
        ("retry:\n  initial_delay: 10\n  max_delay: 5\n", "retry.max_delay"),
        ("listen:\n  host: 0.0.0.0\n", "listen.allowed_networks"),
        ("upstream:\n  ca_file: /nonexistent/ca.pem\n", "upstream.ca_file"),
        ("smtp:\n  port: 1\n", "smtp"),
        ("- a list\n", "config"),
        ("listen: [unclosed\n", "config"),
    ],
)
def test_bad_values_name_the_key(tmp_path, yaml_text, key):
    """Each impossible value raises ConfigError naming its key."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        config.load(path, {})
    assert err.value.key == key


def test_unknown_environment_key_is_refused():
    """A typo in a RELAYD_ variable is an error, not silently ignored."""
    with pytest.raises(ConfigError, match=r"upstream\.hots"):
        config.load(None, {"RELAYD_UPSTREAM_HOTS": "x"})


def test_bad_config_exits_78_with_one_line(tmp_path):
    """`relayd serve` with a bad file: exit 78, one line on stderr naming the key."""
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  host: smtp.example.com\n  port: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "relayd", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "upstream.port" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_without_upstream_says_how_to_try_it(tmp_path):
    """No upstream.host and no --dev: exit 78 pointing at --dev."""
    proc = subprocess.run(
        [sys.executable, "-m", "relayd", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "", "HOME": str(tmp_path)},
        cwd=tmp_path,
    )
    assert proc.returncode == 78
    assert "upstream.host" in proc.stderr and "--dev" in proc.stderr


def test_example_config_shows_exactly_the_defaults():
    """config.example.yaml documents every key with its real default."""
    from pathlib import Path

    example = Path(__file__).parent.parent / "config.example.yaml"
    assert config.load(example, {}) == config.Config()
