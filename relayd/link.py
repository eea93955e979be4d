"""The byte level of a logged-in upstream session: replies parsed in order, writes paced.

aiosmtplib does connect, TLS, EHLO and AUTH; then relayd moves the asyncio transport to a
``Link`` (aiosmtplib_fence.hand_over). aiosmtplib reads one reply per command it waits for
and treats a reply that arrives before that as an error, so it cannot carry a pipelined
flight (RFC 2920); here every reply goes into a queue and is taken in order. Every wait is
bounded by the upstream timeout. Also the body framing both DATA and BDAT need.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Iterator
from dataclasses import dataclass

MAX_LINE = 8192  # bytes of one reply line (RFC 5321 §4.5.3.1.5 says 512; servers exceed it)
MAX_LINES = 100  # lines of one multi-line reply
DATA_CHUNK = 256 * 1024  # bytes written per flow-controlled step of a message body


class ReplyError(ConnectionError):
    """The server sent something that is not an SMTP reply: the session cannot go on."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # the lines' texts joined by "\n", as aiosmtplib reports them


class Link(asyncio.Protocol):
    """Reads replies into a queue and writes with flow control, over a taken-over transport."""

    def __init__(self, transport: asyncio.Transport, timeout: float) -> None:
        self.transport = transport
        self.timeout = timeout
        self.buffer = bytearray()
        self.lines: list[bytes] = []  # the lines so far of a multi-line reply
        self.replies: collections.deque[Reply] = collections.deque()
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.drained: asyncio.Future[None] | None = None

    @classmethod
    def attach(cls, transport: asyncio.Transport, timeout: float) -> Link:
        link = cls(transport, timeout)
        transport.set_protocol(link)
        return link

    # -- asyncio.Protocol -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.buffer += data
        try:
            self._parse()
        except ReplyError as exc:
            self.error = exc
            self.transport.abort()
        self._wake()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = exc or ConnectionResetError("the server closed the connection")
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    # -- relayd's side -----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.error is not None:
            raise self.error
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark again."""
        async with asyncio.timeout(self.timeout):
            while self.paused and self.error is None:
                self.drained = asyncio.get_running_loop().create_future()
                try:
                    await self.drained
                finally:
                    self.drained = None
        if self.error is not None:
            raise self.error

    async def read(self) -> Reply:
        """The next reply, in the order the server sent them."""
        async with asyncio.timeout(self.timeout):
            # A wake-up may bring only part of a reply: wait again until a whole one is here.
            while not self.replies and self.error is None:
                self.waiter = asyncio.get_running_loop().create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
        if self.replies:
            return self.replies.popleft()
        assert self.error is not None
        raise self.error

    def close(self) -> None:
        self.transport.close()

    # -- parsing ------------------------------------------------------------------------------

    def _parse(self) -> None:
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[: end + 1]
            if len(line) > MAX_LINE or len(line) < 3 or not line[:3].isdigit():
                raise ReplyError("the server sent a malformed reply line")
            if line[3:4] not in (b"", b" ", b"-"):
                raise ReplyError("the server sent a malformed reply line")
            self.lines.append(line)
            if len(self.lines) > MAX_LINES or line[:3] != self.lines[0][:3]:
                raise ReplyError("the server sent a malformed multi-line reply")
            if line[3:4] != b"-":
                text = b"\n".join(part[4:].strip(b" \t") for part in self.lines)
                self.replies.append(Reply(int(line[:3]), text.decode("utf-8", "surrogateescape")))
                self.lines = []
        if len(self.buffer) > MAX_LINE:
            raise ReplyError("the server sent a reply line that never ends")

    def _wake(self) -> None:
        for fut in (self.waiter, self.drained):
            if fut is not None and not fut.done():
                fut.set_result(None)


# -- message bodies --------------------------------------------------------------------------

_LINE_END = re.compile(rb"\r\n|\r|\n")


def crlf_clean(message: bytes) -> bool:
    """Every line ends CRLF and there is no bare CR or LF: true of mail spooled from SMTP."""
    crlf = message.count(b"\r\n")
    return message.count(b"\n") == crlf == message.count(b"\r") and message.endswith(b"\r\n")


def crlf_normalised(message: bytes) -> bytes:
    """The message with every line ending CRLF, itself when it already is (no copy)."""
    if crlf_clean(message):
        return message
    fixed = _LINE_END.sub(b"\r\n", message)
    return fixed if fixed.endswith(b"\r\n") else fixed + b"\r\n"


def stuffed_chunks(message: bytes, size: int = DATA_CHUNK) -> Iterator[bytes]:
    """A CRLF-clean message in pieces that end at line ends, each dot-stuffed (RFC 5321 §4.5.2)."""
    start = 0
    while start < len(message):
        end = message.find(b"\r\n", start + size)
        end = len(message) if end < 0 else end + 2
        piece = message[start:end].replace(b"\r\n.", b"\r\n..")
        yield b"." + piece if piece[:1] == b"." else piece
        start = end
