"""Fence: every use relayd makes of aiosmtplib's private members.

aiosmtplib (>=4.0.0, <6) offers no streaming DATA: its data() builds the whole dot-stuffed
message in memory. relayd streams a CRLF-clean spooled message itself, which needs the
protocol's private members in PRIVATE_MEMBERS (of aiosmtplib.protocol.SMTPProtocol):

- ``_command_lock``: held while the body is written, as aiosmtplib holds it per command.
- ``_response_pending``: set so the reply to the final dot is read, not dropped.
- ``_drain_helper``: the transport's flow control between pieces.

When any is missing (streamable() is false) upstream.Session uses the library's data(): each
has that public fallback (FALLBACKS), so `relayd serve` and `relayd check` only say so at
start (relayd.fences). aiosmtplib before 5.1 has no ``_response_pending``: there every message
goes through data(), and CI's run on the lowest allowed version exercises that path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiosmtplib

LIBRARY = "aiosmtplib"
PRIVATE_MEMBERS = {
    "aiosmtplib.protocol.SMTPProtocol": ("_command_lock", "_response_pending", "_drain_helper"),
}
_NAMES = PRIVATE_MEMBERS["aiosmtplib.protocol.SMTPProtocol"]
# What relayd does without a member: all of these serve only the streaming DATA.
FALLBACKS = {
    f"SMTPProtocol.{name}": "messages go through aiosmtplib's data(), which holds each "
    "message several times in memory"
    for name in _NAMES
}
# Everything the streaming path calls on the protocol, private or not.
_STREAM_API = (*_NAMES, "write", "read_response")


async def missing() -> list[str]:
    """The PRIVATE_MEMBERS this aiosmtplib lacks, looked up on a protocol instance."""
    from aiosmtplib.protocol import SMTPProtocol

    proto = SMTPProtocol(loop=asyncio.get_running_loop())
    return [f"SMTPProtocol.{name}" for name in _NAMES if not hasattr(proto, name)]


DATA_CHUNK = 256 * 1024  # bytes written per flow-controlled step of a message body


def crlf_clean(message: bytes) -> bool:
    """Every line ends CRLF and there is no bare CR or LF: true of mail spooled from SMTP."""
    crlf = message.count(b"\r\n")
    return message.count(b"\n") == crlf == message.count(b"\r") and message.endswith(b"\r\n")


def stuffed_chunks(message: bytes, size: int = DATA_CHUNK) -> Iterator[bytes]:
    """A CRLF-clean message in pieces that end at line ends, each dot-stuffed (RFC 5321 §4.5.2)."""
    start = 0
    while start < len(message):
        end = message.find(b"\r\n", start + size)
        end = len(message) if end < 0 else end + 2
        piece = message[start:end].replace(b"\r\n.", b"\r\n..")
        yield b"." + piece if piece[:1] == b"." else piece
        start = end


def streamable(smtp: aiosmtplib.SMTP) -> bool:
    """Whether this aiosmtplib's protocol has every member stream_body() relies on."""
    proto = smtp.protocol
    return proto is not None and all(hasattr(proto, a) for a in _STREAM_API)


async def stream_body(
    smtp: aiosmtplib.SMTP, data: bytes, seconds: float
) -> aiosmtplib.SMTPResponse:
    """After DATA's 354: write the body in flow-controlled pieces, then read the final reply.

    At most one piece is in flight beyond the message itself, where aiosmtplib's data() holds
    the message several times over (docs/benchmarks.md#streaming-data-upstream).
    """
    proto: Any = smtp.protocol
    async with proto._command_lock:
        proto._response_pending = True  # the reply to the final dot is expected
        last = b""
        for piece in stuffed_chunks(data):
            if last:
                await _write_piece(proto, last, seconds)
            last = piece
        # The final dot rides with the last piece: one TLS record and one segment fewer.
        await _write_piece(proto, last + b".\r\n", seconds)
        reply: aiosmtplib.SMTPResponse = await proto.read_response(timeout=seconds)
        return reply


async def _write_piece(proto: Any, piece: bytes, seconds: float) -> None:
    proto.write(piece)
    try:
        async with asyncio.timeout(seconds):
            await proto._drain_helper()
    except TimeoutError:
        raise aiosmtplib.SMTPTimeoutError("timed out sending DATA") from None
