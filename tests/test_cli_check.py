"""`relayd check` against real servers on 127.0.0.1: healthy, untrusted, wrong password, reset."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import sys
from collections.abc import AsyncIterator

import pytest
from conftest import PASSWORD, make_pki
from proc import serve_env


async def check(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run `relayd check ARGS` in a subprocess; returns (exit code, stdout + stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "check",
        *args,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def timed(out: str, step: str) -> bool:
    return re.search(rf"^  {step} +\d+\.\d ms ", out, flags=re.MULTILINE) is not None


async def test_healthy_upstream_passes_with_every_step_timed(tmp_path, pki, sink):
    """Exit 0; dns, connect, tls (protocol, certificate, verified), ehlo, auth each timed."""
    code, out = await check(serve_env(tmp_path / "spool", sink.port, pki.ca_file))
    assert code == 0, out
    for step in ("dns", "connect", "tls", "ehlo", "auth"):
        assert timed(out, step), (step, out)
    assert re.search(r"tls .*TLSv1\.[23] .*certificate .*expires \d{4}-\d\d-\d\d.*verified", out)
    assert "AUTH" in out and "235" in out and "ok: the upstream is reachable" in out
    assert PASSWORD not in out
    assert sink.messages == []


async def test_to_sends_a_real_test_message(tmp_path, pki, sink):
    """--to ADDR sends one message through the checked session."""
    env = serve_env(tmp_path / "spool", sink.port, pki.ca_file)
    code, out = await check(env, "--to", "ops@example.org")
    assert code == 0, out
    assert timed(out, "send") and "250" in out
    (got,) = sink.messages
    assert got.rcpt_tos == ["ops@example.org"] and b"Subject: relayd check" in got.data


async def test_untrusted_certificate_names_tls_and_suggests_ca_file(tmp_path, pki, sink):
    """A certificate from an unknown CA: fails at tls, says why, hints at upstream.ca_file."""
    other = make_pki(tmp_path, "127.0.0.1")
    code, out = await check(serve_env(tmp_path / "spool", sink.port, other.ca_file))
    assert code == 1
    assert "failed at tls" in out and "certificate verify failed" in out
    assert "hint:" in out and "ca_file" in out
    assert timed(out, "connect") and not timed(out, "auth")
    assert sink.logins == [] and sink.auth_failures == 0


async def test_wrong_password_names_auth_with_the_servers_reply(tmp_path, pki, sink):
    """535 from the server: fails at auth, prints the reply and a hint, never the password."""
    sink.password = "another-password"
    code, out = await check(serve_env(tmp_path / "spool", sink.port, pki.ca_file))
    assert code == 1
    assert "failed at auth" in out and "server said: 535" in out
    assert "hint:" in out and "password" in out.split("hint:")[1]
    assert timed(out, "tls") and timed(out, "ehlo")
    assert PASSWORD not in out


@pytest.fixture
async def resetter() -> AsyncIterator[int]:
    """A server that reads the ClientHello, then closes with SO_LINGER 0: the client gets RST."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the handshake has begun
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_reset_during_tls_handshake_is_diagnosed(tmp_path, pki, resetter):
    """A connection reset during the handshake: fails at tls, says reset, points to 465."""
    code, out = await check(serve_env(tmp_path / "spool", resetter, pki.ca_file))
    assert code == 1
    assert "failed at tls" in out and "reset" in out.lower()
    assert "hint:" in out and "465" in out.split("hint:")[1]
    assert timed(out, "connect")
