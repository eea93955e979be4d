"""Bad clients: oversize, too many recipients, garbage, smuggling, odd bytes, slowloris, and
clients that vanish. Each gets a defined answer; none crashes relayd or splits a message."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest
from conftest import eventually, make_config, message, queue_files, running, submit
from faults import FaultServer


@pytest.fixture
async def upstream(pki) -> AsyncIterator[FaultServer]:
    async with FaultServer(pki) as fs:
        yield fs


class Raw:
    """A byte-exact SMTP client: what it sends is exactly what crosses the socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        raw = cls(reader, writer)
        assert (await raw.reply()).startswith("220")
        return raw

    async def reply(self) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            assert line, "connection closed"
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    async def cmd(self, data: bytes) -> str:
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()

    async def envelope(self, rcpts: int = 1) -> None:
        assert (await self.cmd(b"EHLO raw.test\r\n")).startswith("250")
        assert (await self.cmd(b"MAIL FROM:<app@example.com>\r\n")).startswith("250")
        for i in range(rcpts):
            assert (await self.cmd(b"RCPT TO:<u%d@example.org>\r\n" % i)).startswith("250")

    async def send_data(self, body: bytes) -> str:
        assert (await self.cmd(b"DATA\r\n")).startswith("354")
        return await self.cmd(body + (b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n"))

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
def cfg(tmp_path, pki, upstream):
    return make_config(
        tmp_path,
        upstream.port,
        pki.ca_file,
        listen_max_message_size="20000",
        listen_max_recipients="3",
        listen_timeout="1",
    )


async def test_size_parameter_over_the_limit_is_refused_at_mail(cfg):
    """MAIL FROM with SIZE= above max_message_size: 552 before any data is sent."""
    async with running(cfg) as d:
        raw = await Raw.connect(d.address[1])
        await raw.cmd(b"EHLO raw.test\r\n")
        reply = await raw.cmd(b"MAIL FROM:<app@example.com> SIZE=20001\r\n")
        raw.close()
    assert reply.startswith("552"), reply
    assert queue_files(cfg) == []


async def test_oversize_body_gets_552_and_nothing_is_spooled(cfg):
    """A body larger than max_message_size: 552 after the final dot, spool untouched."""
    async with running(cfg) as d:
        code, _ = await submit(
            d.address[1],
            "app@example.com",
            ["u@example.org"],
            message(body=("x" * 70 + "\r\n") * 400),
        )
    assert code == 552
    assert queue_files(cfg) == [] and queue_files(cfg, "tmp") == []


async def test_too_many_recipients_get_452_and_the_rest_are_kept(cfg, upstream):
    """The 4th RCPT (max_recipients 3) gets 452; the message goes to the first three."""
    async with running(cfg) as d:
        raw = await Raw.connect(d.address[1])
        await raw.envelope(rcpts=3)
        extra = await raw.cmd(b"RCPT TO:<four@example.org>\r\n")
        final = await raw.send_data(message())
        raw.close()
        await eventually(lambda: upstream.messages, what="delivery")
    assert extra.startswith("452 4.5.3"), extra
    assert final.startswith("250")
    assert upstream.messages[0].rcpt_tos == ["u0@example.org", "u1@example.org", "u2@example.org"]


async def test_garbage_commands_get_500s_and_the_session_goes_on(cfg, upstream):
    """Unknown verbs, binary junk and an empty line each get a 5xx; then a send succeeds."""
    async with running(cfg) as d:
        raw = await Raw.connect(d.address[1])
        replies = [
            await raw.cmd(line) for line in (b"HELLO?\r\n", b"\x00\xff\xfe junk\r\n", b"\r\n")
        ]
        await raw.envelope()
        final = await raw.send_data(message())
        raw.close()
    assert all(r[:1] == "5" for r in replies), replies
    assert final.startswith("250")


SMUGGLING = [
    b"\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.org>\nDATA\nsmuggled\n.\n",
    b"\r.\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nsmuggled\r\n",
    b"\n.\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nx\r\n",
    b"\r\n.\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nx\r\n",
]


@pytest.mark.parametrize(
    "payload", SMUGGLING, ids=["lf-dot-lf", "cr-dot-lf", "lf-dot-crlf", "crlf-dot-lf"]
)
async def test_smuggling_never_splits_one_message_into_two(cfg, upstream, payload):
    """Bare LF/CR end-of-data look-alikes (CVE-2024-27305) stay inside one message upstream."""
    async with running(cfg) as d:
        raw = await Raw.connect(d.address[1])
        await raw.envelope()
        final = await raw.send_data(message() + payload + b"tail")
        raw.close()
        await eventually(lambda: upstream.messages, what="delivery")
        await eventually(lambda: not queue_files(cfg), what="spool emptied")
    assert final.startswith("250")
    assert len(upstream.messages) == 1
    assert upstream.commands.count("MAIL") == 1
    wire = upstream.messages[0].wire[: -len(b"\r\n.\r\n")]
    # No end-of-data look-alike crosses the wire, so not even a lenient upstream can split it.
    for seq in (b"\n.\n", b"\r.\n", b"\n.\r", b"\r\n.\r\n"):
        assert seq not in wire, seq
    assert b"victim@example.org" in upstream.messages[0].data


ODD_BODIES = {
    "nul-bytes": b"a\x00b\x00c\r\n",
    "10000-char-line": b"<p>" + b"x" * 10000 + b"</p>\r\n",
    "8bit-without-8bitmime": "caf\u00e9 na\u00efve \u2603\r\n".encode(),
}


async def relay_raw(cfg, upstream, data: bytes) -> tuple[str, bytes]:
    """Send data as raw DATA bytes; the reply to the final dot and what the upstream got."""
    async with running(cfg) as d:
        raw = await Raw.connect(d.address[1])
        await raw.envelope()
        final = await raw.send_data(data)
        raw.close()
        await eventually(lambda: upstream.messages, what="delivery")
    return final, upstream.messages[0].data


@pytest.mark.parametrize("body", list(ODD_BODIES.values()), ids=list(ODD_BODIES))
async def test_odd_bytes_are_accepted_and_relayed_unchanged(cfg, upstream, body):
    """NUL bytes, a 10,000-character line, 8-bit data without BODY=8BITMIME: 250, same bytes."""
    data = message(body=body.decode("latin-1"))
    data = data.replace(data[data.index(b"\r\n\r\n") + 4 :], body)
    final, delivered = await relay_raw(cfg, upstream, data)
    assert final.startswith("250"), final
    assert delivered == data


async def test_invalid_utf8_in_headers_is_kept_byte_for_byte(cfg, upstream):
    """Header bytes that are not UTF-8 are neither decoded nor rejected: relayed verbatim."""
    data = b"Subject: \xff\xfe broken \xc3\x28\r\nFrom: \x80@example.com\r\n\r\nbody\r\n"
    final, delivered = await relay_raw(cfg, upstream, data)
    assert final.startswith("250"), final
    assert b"Subject: \xff\xfe broken \xc3\x28\r\n" in delivered


async def test_a_line_beyond_the_line_limit_gets_500_and_nothing_is_spooled(cfg):
    """A 100,000-byte line (over the 64 KiB line limit): 500, nothing queued, session goes on."""
    async with running(cfg) as d:
        raw = await Raw.connect(d.address[1])
        await raw.envelope()
        reply = await raw.send_data(b"Subject: x\r\n\r\n" + b"y" * 100_000)
        after = await raw.cmd(b"NOOP\r\n")
        raw.close()
    assert reply.startswith(("500", "552")), reply
    assert after.startswith("250")
    assert queue_files(cfg) == []


async def test_idle_connections_time_out_and_never_block_a_new_client(cfg, upstream):
    """300 idle clients (slowloris) within listen.max_sessions: a new client still gets 250;
    the idle ones are cut off. (Beyond max_sessions a client gets 421 4.7.0 instead:
    test_session_limits.py.)"""
    cfg = dataclasses.replace(cfg, listen=dataclasses.replace(cfg.listen, max_sessions=400))
    async with running(cfg) as d:
        idle = [await asyncio.open_connection("127.0.0.1", d.address[1]) for _ in range(300)]
        code, _ = await submit(d.address[1], "app@example.com", ["u@example.org"], message())
        assert code == 250

        async def closed(reader: asyncio.StreamReader) -> bool:
            with contextlib.suppress(ConnectionError):
                while await asyncio.wait_for(reader.read(4096), 10):
                    pass
            return True

        results = await asyncio.gather(*(closed(r) for r, _ in idle))
        for _, w in idle:
            w.close()
    assert all(results) and len(results) == 300


async def test_a_client_vanishing_mid_data_leaves_nothing_queued(cfg, upstream):
    """Half a body then a reset: no queue entry, no tmp/ debris; the next client is served."""
    async with running(cfg) as d:
        raw = await Raw.connect(d.address[1])
        await raw.envelope()
        assert (await raw.cmd(b"DATA\r\n")).startswith("354")
        raw.writer.write(b"Subject: half\r\n\r\nonly half of th")
        await raw.writer.drain()
        raw.writer.transport.abort()
        code, _ = await submit(d.address[1], "app@example.com", ["u@example.org"], message("ok"))
        assert code == 250
        await eventually(lambda: upstream.messages, what="the complete message delivered")
        await eventually(lambda: not queue_files(cfg), what="spool emptied")
    assert [m.data for m in upstream.messages] == [message("ok")]
    assert queue_files(cfg, "tmp") == []


async def test_missing_message_id_and_date_are_added(cfg, upstream):
    """A message without Message-ID and Date reaches the upstream with both (as Postfix adds)."""
    bare = b"From: app@example.com\r\nTo: u@example.org\r\nSubject: bare\r\n\r\nhi\r\n"
    async with running(cfg) as d:
        await submit(d.address[1], "app@example.com", ["u@example.org"], bare)
        await submit(d.address[1], "app@example.com", ["u@example.org"], message("full"))
        await eventually(lambda: len(upstream.messages) == 2, what="both delivered")
    by_subject = {
        m.data.split(b"Subject: ")[1].split(b"\r\n")[0]: m.data for m in upstream.messages
    }
    added = by_subject[b"bare"]
    assert added.endswith(bare)
    head = added[: -len(bare)]
    assert head.startswith(b"Date: ") and b"\r\nMessage-ID: <" in head
    assert b"@" + cfg.listen.hostname.encode() + b">" in head
    assert by_subject[b"full"] == message("full")
