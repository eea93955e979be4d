"""Streaming DATA: the same bytes on the wire as aiosmtplib's own dot-stuffing, in pieces."""

from __future__ import annotations

import random

import pytest
from aiosmtplib.protocol import PERIOD_REGEX
from conftest import eventually, make_config, running, submit

from relayd.link import crlf_clean, stuffed_chunks


def random_message(rng: random.Random, lines: int) -> bytes:
    alphabet = [b".", b"..", b"a", b"x.y", b"", b" .", b"\xc3\xa9"]
    out = []
    for _ in range(lines):
        out.append(b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) + b"\r\n")
    return b"".join(out)


@pytest.mark.parametrize("size", [1, 7, 64, 1 << 18])
def test_pieces_join_to_the_library_stuffing(size):
    """For any piece size, the pieces are exactly aiosmtplib's (?m)^\\. -> .. output."""
    rng = random.Random(size)
    for _ in range(300):
        msg = random_message(rng, rng.randint(1, 40))
        assert crlf_clean(msg)
        pieces = list(stuffed_chunks(msg, size))
        assert b"".join(pieces) == PERIOD_REGEX.sub(b"..", msg)
        assert all(p.endswith(b"\r\n") for p in pieces), "pieces end at line ends"


def test_only_crlf_clean_messages_are_streamed():
    """Bare LF or CR, or no final CRLF, leave the message to the library's normaliser."""
    assert not crlf_clean(b"a\nb\r\n")
    assert not crlf_clean(b"a\rb\r\n")
    assert not crlf_clean(b"a\r\nb")
    assert crlf_clean(b"a\r\n.b\r\n")


async def test_a_large_message_with_dot_lines_arrives_byte_for_byte(tmp_path, pki, sink):
    """A 2 MiB body (several pieces) with leading dots everywhere is delivered unchanged."""
    head = b"Subject: big\r\nDate: Mon, 30 Nov 2026 05:00:00 +0000\r\nMessage-ID: <b@x>\r\n\r\n"
    body = b"".join(b".line %d ....\r\n..\r\n" % i for i in range(90_000))
    cfg = make_config(tmp_path, sink.port, pki.ca_file)
    async with running(cfg) as d:
        code, _ = await submit(d.address[1], "app@example.com", ["u@example.org"], head + body)
        assert code == 250
        await eventually(lambda: sink.messages, timeout=30, what="delivery")
    assert sink.messages[0].data == head + body
