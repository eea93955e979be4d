"""The bulk DATA reader: same end-of-data rule and un-stuffing as RFC 5321 and aiosmtpd."""

from __future__ import annotations

import asyncio

import pytest

from relayd.aiosmtpd_fence import LINE_LIMIT, R_DATA_TOO_BIG, R_LINE_TOO_LONG, read_data


async def feed(*pieces: bytes, limit: int | None = 10_000) -> tuple[bytes, str, bytes]:
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    for piece in pieces:
        reader.feed_data(piece)
    reader.feed_eof()
    body, problem = await read_data(reader, limit)
    return body, problem, await reader.read()


@pytest.mark.parametrize(
    ("wire", "body"),
    [
        (b".\r\n", b""),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"..dot\r\n.\r\n", b".dot\r\n"),
        (b"x\r\n..\r\ny.\r\n.\r\n", b"x\r\n.\r\ny.\r\n"),
        (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n"),  # bare LF dot: smuggling stays data
        (b"a\r.\r\nb\r\n.\r\n", b"a\r.\r\nb\r\n"),  # bare CR dot likewise
        (b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n"),
        (b"end.\r\n.\r\n", b"end.\r\n"),
        (b"\r\n.\r\n", b"\r\n"),
    ],
)
async def test_end_of_data_and_unstuffing(wire, body):
    """Only a line "." after CRLF ends DATA; a leading dot of a line is removed."""
    got, problem, rest = await feed(wire + b"QUIT\r\n")
    assert (got, problem) == (body, "")
    assert rest == b"QUIT\r\n", "pipelined commands after DATA stay in the stream"


async def test_terminator_split_across_reads():
    """The end is found when its bytes arrive in separate pieces."""
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    task = asyncio.create_task(read_data(reader, None))
    for piece in (b"hello\r", b"\n", b".", b"\r", b"\nRSET\r\n"):
        reader.feed_data(piece)
        await asyncio.sleep(0)
    assert await task == (b"hello\r\n", "")
    assert await reader.readline() == b"RSET\r\n"


async def test_large_body_and_long_lines():
    """Bodies far over the reader's buffer and 10,000-octet lines come through intact."""
    body = (b"x" * 10_000 + b"\r\n") * 300
    got, problem, _ = await feed(body, b".\r\n", limit=None)
    assert problem == "" and got == body


async def test_over_the_size_limit_reads_to_the_end_and_keeps_nothing():
    """Over the limit: 552, and the session is positioned after the end of DATA."""
    got, problem, rest = await feed(b"y" * 50_000 + b"\r\n.\r\nNOOP\r\n", limit=1000)
    assert (got, problem, rest) == (b"", R_DATA_TOO_BIG, b"NOOP\r\n")


async def test_line_over_the_line_limit_is_refused():
    """A single line longer than 64 KiB gets 500, nothing kept."""
    got, problem, rest = await feed(b"z" * (LINE_LIMIT + 10) + b"\r\n.\r\n", limit=None)
    assert (got, problem, rest) == (b"", R_LINE_TOO_LONG, b"")


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_missing_headers_are_given_only_when_absent(kind):
    """Date and Message-ID lines come back only when absent, for received buffers and bytes
    alike; a Date or Message-ID past the first blank line (in the body) does not count."""
    from relayd.message import missing_headers

    bare = kind(b"Subject: x\r\n\r\nDate: in the body\r\n")
    extra = missing_headers(bare, "ID1", "relay.test", 0.0)
    assert extra.startswith(b"Date: Thu, 01 Jan 1970 00:00:00 +0000\r\n")
    assert extra.endswith(b"Message-ID: <ID1@relay.test>\r\n")
    full = kind(b"Date: x\r\nMessage-id: <a@b>\r\n\r\nbody\r\n")
    assert missing_headers(full, "ID2", "relay.test", 0.0) == b""
