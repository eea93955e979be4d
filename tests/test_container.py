"""The image's and the Compose example's RELAYD_* settings are real, valid config.

These tests feed the variables the Dockerfile and docker-compose.yml set through relayd's own
config loader and CLI; scripts/container-proof builds and runs the image itself.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from relayd import config as config_mod
from relayd.errors import ConfigError
from relayd.spool import Spool

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


def run_relayd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`relayd ARGS` as its own process with exactly env (plus what Python needs to run)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    return subprocess.run(
        [sys.executable, "-m", "relayd", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def image_env(spool: Path) -> dict[str, str]:
    """The image's ENV and nothing else, as in `docker run --rm -v VOLUME IMAGE queue list`."""
    return {**dockerfile_env(), "RELAYD_SPOOL_PATH": str(spool)}


def test_queue_list_runs_with_the_image_environment(tmp_path):
    """A second container's `queue list` is not refused over listen settings only serve uses."""
    Spool(tmp_path).create()
    done = run_relayd(image_env(tmp_path), "queue", "list")
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "queue empty", "")


def test_health_runs_with_the_image_environment(tmp_path):
    """`health` with the image's environment reports the daemon, not a config error (78)."""
    Spool(tmp_path).create()
    done = run_relayd(image_env(tmp_path), "health")
    assert done.returncode == 1
    assert done.stdout.startswith("relayd: down: no relayd holds the lock")


def test_serve_with_the_image_environment_still_names_allowed_networks(tmp_path):
    """The exposure check still stops `serve` itself: exit 78, one line naming the key."""
    env = {**image_env(tmp_path), "RELAYD_UPSTREAM_HOST": "smtp.example.com"}
    done = run_relayd(env, "serve")
    assert done.returncode == 78
    assert done.stderr.count("\n") == 1 and "listen.allowed_networks" in done.stderr


@contextlib.contextmanager
def lock_held_as_pid_1(spool: Path) -> Iterator[None]:
    """relayd.lock held and naming pid 1, as a daemon that is pid 1 in another container."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(spool / "relayd.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.communicate("", timeout=10)


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, b"1\\n")
print("locked", flush=True)
sys.stdin.read()
"""


def test_flush_that_cannot_reach_the_daemon_says_how(tmp_path):
    """A daemon in another pid namespace: flush says so in one line naming `docker exec`."""
    spool = Spool(tmp_path)
    spool.create()
    spool.put("app@example.com", ["u@example.org"], b"Subject: x\r\n\r\nx\r\n", time.time())
    with lock_held_as_pid_1(tmp_path):
        done = run_relayd(image_env(tmp_path), "queue", "flush")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "not in this pid namespace" in done.stderr
    assert "docker exec <container> relayd queue flush" in done.stderr
    assert len(list(spool.scan())) == 1, "the message stays queued"
