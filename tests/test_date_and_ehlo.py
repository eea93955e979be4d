"""Two header/greeting details: the added Date says +0000 (RFC 5322 §3.3: -0000 means "the
zone is unknown"), and the name relayd gives in EHLO upstream is its own setting."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import pytest
from conftest import Sink, eventually, start_sink, stop_sink, submit
from proc import ServeProcess, serve_env
from rawsmtp import Wire

BARE = b"From: app@example.com\r\nTo: u@example.org\r\nSubject: no date\r\n\r\nHi.\r\n"


class GreetedSink(Sink):
    """The test upstream, also keeping the name each session's EHLO gave."""

    def __init__(self) -> None:
        super().__init__()
        self.ehlo_names: list[str] = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.ehlo_names.append(hostname)
        session.host_name = hostname
        return responses


@pytest.fixture
async def greeted(pki):
    s = await start_sink(GreetedSink(), pki.server_ctx)
    yield s
    await stop_sink(s)


async def serve(tmp_path, pki, upstream, **extra: str) -> ServeProcess:
    env = serve_env(tmp_path / "spool", upstream.port, pki.ca_file, **extra)
    return await ServeProcess(env).start()


async def test_an_added_date_header_says_plus_0000(tmp_path, pki, greeted):
    """A message without Date gets `Date: …, dd Mon yyyy hh:mm:ss +0000`, never -0000."""
    proc = await serve(tmp_path, pki, greeted)
    try:
        assert (await submit(proc.port, "app@example.com", ["u@example.org"], BARE))[0] == 250
        await eventually(lambda: greeted.messages, what="delivery")
    finally:
        assert await proc.stop() == 0
    date = re.search(rb"^Date: (.*)\r$", greeted.messages[0].data, flags=re.MULTILINE)
    assert date is not None
    assert re.fullmatch(rb"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000", date[1]), date[1]


async def test_upstream_sessions_say_upstream_ehlo_name(tmp_path, pki, greeted):
    """upstream.ehlo_name is what the provider is told in EHLO; the listener keeps
    listen.hostname in its banner."""
    proc = await serve(
        tmp_path, pki, greeted, listen_hostname="relay.local", upstream_ehlo_name="mx.example.com"
    )
    try:
        wire = await Wire.open(proc.port)
        banner = await wire.reply()
        wire.close()
        assert (await submit(proc.port, "app@example.com", ["u@example.org"], BARE))[0] == 250
        await eventually(lambda: greeted.messages, what="delivery")
    finally:
        assert await proc.stop() == 0
    assert banner[1].startswith("relay.local ")
    assert set(greeted.ehlo_names) == {"mx.example.com"}
    assert b"@relay.local>" in greeted.messages[0].data  # the added Message-ID: the listener's


async def test_without_ehlo_name_upstream_sessions_say_listen_hostname(tmp_path, pki, greeted):
    """upstream.ehlo_name unset: EHLO gives listen.hostname, as before."""
    proc = await serve(tmp_path, pki, greeted, listen_hostname="relay.local")
    try:
        assert (await submit(proc.port, "app@example.com", ["u@example.org"], BARE))[0] == 250
        await eventually(lambda: greeted.messages, what="delivery")
    finally:
        assert await proc.stop() == 0
    assert set(greeted.ehlo_names) == {"relay.local"}


async def test_check_says_upstream_ehlo_name(tmp_path, pki, greeted):
    """`relayd check` greets the provider as the daemon would: with upstream.ehlo_name."""
    env = serve_env(
        tmp_path / "spool",
        greeted.port,
        pki.ca_file,
        listen_hostname="relay.local",
        upstream_ehlo_name="mx.example.com",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "check",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    assert greeted.ehlo_names == ["mx.example.com"]
