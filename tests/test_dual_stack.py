"""`listen.host: "::"` is one dual-stack listener: IPv4 clients arrive as ::ffff:a.b.c.d and are
matched against allowed_networks written as IPv4; what cannot be matched is refused.

The address tests need a peer that is not loopback. They run relayd in a network namespace of
their own (unshare -n, as root) whose loopback also carries 192.0.2.10 (TEST-NET-1), and
connect from inside it (nsenter); without that they are skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest
from conftest import free_port
from proc import ServeProcess, serve_env
from rawsmtp import Wire, has_ipv6_loopback

from relayd.server import Handler

PEER = "192.0.2.10"
NETNS = f'ip link set lo up && ip addr add {PEER}/32 dev lo && exec "$@"'

# Run inside the namespace: EHLO and MAIL from PEER to PEER:port, print the MAIL reply.
CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rwb")
def reply():
    while True:
        line = f.readline()
        if line[3:4] != b"-":
            return line.decode().strip()
reply()
f.write(b"EHLO peer.test\\r\\n"); f.flush(); reply()
f.write(b"MAIL FROM:<app@example.com>\\r\\n"); f.flush(); print(reply())
"""


def can_unshare() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")):
        return False
    try:
        subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return shutil.which("ip") is not None


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")
needs_netns = pytest.mark.skipif(
    not can_unshare(), reason="needs root, unshare, nsenter and ip for a network namespace"
)


async def mail_reply_from_peer(tmp_path, pki, allowed: str) -> str:
    env = serve_env(
        tmp_path / "spool",
        free_port(),
        pki.ca_file,
        listen_host="::",
        listen_allowed_networks=allowed,
    )
    proc = ServeProcess(env, prefix=["unshare", "-n", "sh", "-c", NETNS, "sh"])
    await proc.start()
    try:
        assert proc.proc is not None
        client = await asyncio.create_subprocess_exec(
            "nsenter",
            "-t",
            str(proc.proc.pid),
            "-n",
            sys.executable,
            "-c",
            CLIENT,
            PEER,
            str(proc.port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(client.communicate(), 30)
        return out.decode().strip()
    finally:
        assert await proc.stop() == 0


@needs_ipv6
async def test_an_ipv4_client_reaches_a_dual_stack_listener(tmp_path, pki):
    """host "::" takes IPv4 too: a client on 127.0.0.1 (seen as ::ffff:127.0.0.1, loopback)
    gets the banner and may submit."""
    env = serve_env(
        tmp_path / "spool",
        free_port(),
        pki.ca_file,
        listen_host="::",
        listen_allowed_networks="::1/128",
    )
    proc = await ServeProcess(env).start()
    try:
        wire = await Wire.open(proc.port, host="127.0.0.1")
        try:
            await wire.greet()
            assert (await wire.cmd(b"MAIL FROM:<app@example.com>"))[0] == 250
        finally:
            wire.close()
    finally:
        assert await proc.stop() == 0


@needs_ipv6
@needs_netns
async def test_a_mapped_ipv4_peer_matches_an_ipv4_allowed_network(tmp_path, pki):
    """allowed_networks 192.0.2.0/24 and a peer 192.0.2.10 on a "::" listener: 250 at MAIL."""
    reply = await mail_reply_from_peer(tmp_path, pki, "192.0.2.0/24")
    assert reply.startswith("250"), reply


@needs_ipv6
@needs_netns
async def test_a_mapped_ipv4_peer_outside_the_allowed_networks_is_refused(tmp_path, pki):
    """allowed_networks 198.51.100.0/24 and the peer 192.0.2.10: 550 5.7.1 at MAIL."""
    reply = await mail_reply_from_peer(tmp_path, pki, "198.51.100.0/24")
    assert reply.startswith("550 5.7.1"), reply


@pytest.mark.parametrize("peer", [None, "", (), "/run/relayd.sock", ("not-an-ip", 25)])
def test_a_peer_that_is_not_an_ip_address_is_refused(tmp_path, peer):
    """A peer of a type relayd does not know (no TCP address) fails closed. (No TCP client
    can produce one, so the access check is asked directly.)"""
    from relayd.config import ListenConfig

    handler = Handler(ListenConfig(), spool=None, on_accepted=lambda env: None)  # type: ignore[arg-type]
    assert handler.allowed(peer) is False
