"""Who may submit: loopback by default, allowed_networks, and optional AUTH from a users file."""

from __future__ import annotations

import socket
import subprocess
import sys

import aiosmtplib
import pytest
from conftest import (
    SUBMITTER,
    SUBMITTER_PASSWORD,
    eventually,
    make_config,
    message,
    queue_files,
    running,
)
from faults import FaultServer
from structlog.testing import capture_logs

from relayd import auth
from relayd import config as config_mod
from relayd.errors import ConfigError


def local_address() -> str:
    """A non-loopback address of this host, so the listener sees a peer that is not 127.x."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            ip = str(s.getsockname()[0])
        except OSError:
            ip = ""
    if not ip or ip.startswith("127."):
        pytest.skip("no non-loopback IPv4 address on this host")
    return ip


async def send(host: str, port: int, login: tuple[str, str] | None = None) -> tuple[int, str]:
    client = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, local_hostname="peer.test", timeout=10
    )
    await client.connect()
    try:
        await client.ehlo()
        if login:
            await client.login(*login)
        await client.sendmail("app@example.com", ["u@example.org"], message())
        return 250, "ok"
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        client.close()


@pytest.fixture
async def upstream(pki):
    async with FaultServer(pki) as fs:
        yield fs


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"# submitters\n{SUBMITTER}:{auth.hash_password(SUBMITTER_PASSWORD)}\n")
    return path


async def test_a_peer_outside_allowed_networks_gets_550_and_is_logged(tmp_path, pki, upstream):
    """A non-loopback peer not in allowed_networks: 550 5.7.1 at MAIL, client.refused logged."""
    ip = local_address()
    cfg = make_config(
        tmp_path,
        upstream.port,
        pki.ca_file,
        listen_host=ip,
        listen_allowed_networks="198.51.100.0/24",
    )
    with capture_logs() as logs:
        async with running(cfg) as d:
            code, text = await send(ip, d.address[1])
    assert code == 550 and "5.7.1" in text
    refused = [e for e in logs if e["event"] == "client.refused"]
    assert refused and refused[0]["peer"] == ip
    assert queue_files(cfg) == []


async def test_a_peer_inside_allowed_networks_may_submit(tmp_path, pki, upstream):
    """allowed_networks covering the peer's address: 250 and delivery."""
    ip = local_address()
    cfg = make_config(
        tmp_path, upstream.port, pki.ca_file, listen_host=ip, listen_allowed_networks=f"{ip}/32"
    )
    async with running(cfg) as d:
        assert (await send(ip, d.address[1]))[0] == 250
        await eventually(lambda: upstream.messages, what="delivery")


async def test_auth_is_not_offered_without_a_users_file(tmp_path, pki, upstream):
    """No users file: EHLO advertises no AUTH (nothing to check a password against)."""
    cfg = make_config(tmp_path, upstream.port, pki.ca_file)
    async with running(cfg) as d:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.address[1], start_tls=False)
        await client.connect()
        await client.ehlo()
        offered = client.supports_extension("auth")
        client.close()
    assert not offered


async def test_with_a_users_file_outsiders_must_log_in(tmp_path, pki, upstream, users_file):
    """Outside allowed networks: no AUTH -> 530, wrong password -> 535 (logged), right -> 250."""
    ip = local_address()
    cfg = make_config(
        tmp_path, upstream.port, pki.ca_file, listen_host=ip, listen_users_file=str(users_file)
    )
    with capture_logs() as logs:
        async with running(cfg) as d:
            port = d.address[1]
            no_auth = await send(ip, port)
            wrong = await send(ip, port, (SUBMITTER, "not-the-password"))
            right = await send(ip, port, (SUBMITTER, SUBMITTER_PASSWORD))
            await eventually(lambda: upstream.messages, what="delivery")
    assert no_auth[0] == 530
    assert wrong[0] == 535
    assert right[0] == 250
    failed = [e for e in logs if e["event"] == "client.auth_failed"]
    assert failed and failed[0]["user"] == SUBMITTER and failed[0]["peer"] == ip
    assert SUBMITTER_PASSWORD not in repr(logs)


async def test_loopback_still_needs_no_login_when_auth_is_offered(
    tmp_path, pki, upstream, users_file
):
    """Apps on the same host keep sending without credentials when a users file is set."""
    cfg = make_config(tmp_path, upstream.port, pki.ca_file, listen_users_file=str(users_file))
    async with running(cfg) as d:
        assert (await send("127.0.0.1", d.address[1]))[0] == 250


def test_plaintext_auth_on_a_public_address_is_refused(users_file):
    """AUTH over a TLS-less listener bound to a public address: exit 78 naming the key."""
    env = {"RELAYD_LISTEN_HOST": "8.8.8.8", "RELAYD_LISTEN_USERS_FILE": str(users_file)}
    with pytest.raises(ConfigError, match=r"listen\.users_file"):
        config_mod.load(None, env)


def test_passwd_prints_a_verifiable_hash_and_never_the_password():
    """`relayd passwd --stdin NAME` prints name:scrypt$…; the password is not in the output."""
    out = subprocess.run(
        [sys.executable, "-m", "relayd", "passwd", "--stdin", SUBMITTER],
        input=SUBMITTER_PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    name, _, stored = out.stdout.strip().partition(":")
    assert name == SUBMITTER and stored.startswith("scrypt$")
    assert auth.Users({name: stored}).verify(SUBMITTER, SUBMITTER_PASSWORD)
    assert SUBMITTER_PASSWORD not in out.stdout + out.stderr


def test_users_repr_shows_no_hashes(users_file):
    """repr of the loaded users names only their count."""
    users = auth.load_users(str(users_file))
    assert repr(users) == "<auth.Users 1 users>"


async def test_password_checks_run_off_the_event_loop(
    tmp_path, pki, upstream, users_file, monkeypatch
):
    """scrypt (~50 ms) runs in a thread, so wrong passwords cannot stall other sessions."""
    import threading

    threads: list[bool] = []
    original = auth.Users.verify

    def recording(self, name, password):
        threads.append(threading.current_thread() is threading.main_thread())
        return original(self, name, password)

    monkeypatch.setattr(auth.Users, "verify", recording)
    cfg = make_config(tmp_path, upstream.port, pki.ca_file, listen_users_file=str(users_file))
    async with running(cfg) as d:
        wrong = await send("127.0.0.1", d.address[1], (SUBMITTER, "not-the-password"))
        right = await send("127.0.0.1", d.address[1], (SUBMITTER, SUBMITTER_PASSWORD))
    assert (wrong[0], right[0]) == (535, 250)
    assert threads and not any(threads)  # every check (PLAIN, then LOGIN) in a thread
